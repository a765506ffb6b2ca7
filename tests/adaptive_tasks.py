"""A task whose memory grows with a per-sample length, for the adaptive micro-batching tests.

Each sample carries its length in feature 0 and its index in feature 1. The model
expands every sample of a micro-batch to the longest length in that micro-batch
(``micro × longest × HIDDEN`` floats, a few times over for the backward pass), masks
the padding and mean-pools. A sample's output does not depend on its neighbours,
so any split of a window gives the same gradient up to float rounding; but memory
depends on the longest sample in each micro-batch, so under a real budget only
micro-batches that hold one of the few long samples run out of memory at the large
micro-batch size, and fit at half of it.

The model also counts, in non-trainable state, the samples its training forward
passes saw and the sum and sum of squares of their indices: a redone window that
did not roll that state back, a lost sample or a sample seen twice all show there.
"""

from __future__ import annotations

import numpy as np

from autobatch.tasks.workload import Workload

N_TRAIN = 192
N_VAL = 32
N_FEATURES = 4
HIDDEN = 2048
LONG = 2048  # the long samples' length: micro × LONG × HIDDEN floats per activation
SHORT_MAX = 8
#: training samples that are long; with a seeded order they fall in a few windows only
LONG_SAMPLES = (17, 101, 150)
POSITION_SCALE = 1.0 / 64.0


def length_split(seed: int = 7):
    rng = np.random.default_rng(seed)
    total = N_TRAIN + N_VAL
    features = rng.normal(size=(total, N_FEATURES)).astype(np.float32)
    lengths = rng.integers(1, SHORT_MAX + 1, size=total).astype(np.float32)
    lengths[list(LONG_SAMPLES)] = LONG
    ids = np.arange(total, dtype=np.float32)
    x = np.concatenate([lengths[:, None], ids[:, None], features], axis=1)
    y = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(np.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def lengths() -> Workload:
    x_train, y_train, x_val, y_val = length_split()
    return Workload(
        name="lengths",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        models={"torch": "tests.adaptive_tasks:torch_model", "tensorflow": "tests.adaptive_tasks:keras_model"},
        loss="cross_entropy",
        optimizer="sgd",  # linear in the gradients: float rounding stays float rounding
        base_batch_size=16,
        base_learning_rate=0.05,
        description="masked mean-pool over a per-sample length; memory grows with the longest sample",
    )


def crashing() -> Workload:
    """``lengths`` with a small model that kills its own process, as TensorFlow's oneDNN kernels do on the CPU.

    A micro-batch of more than ``CRASH_ABOVE`` samples that holds a long sample logs an
    OOM line and dies of SIGKILL: what ``autobatch train`` must survive by resuming in a
    new process from its last checkpoint.
    """
    workload = lengths()
    workload.name = "lengths-crashing"
    workload.models = {"torch": "tests.adaptive_tasks:crashing_torch_model"}
    return workload


def silently_crashing() -> Workload:
    """``crashing`` without the OOM line, and by SIGSEGV: a null from a failed allocation, dereferenced.

    TensorFlow's C++ kernels sometimes die so under ``RLIMIT_DATA``, logging nothing.
    """
    workload = lengths()
    workload.name = "lengths-silently-crashing"
    workload.models = {"torch": "tests.adaptive_tasks:silently_crashing_torch_model"}
    return workload


def poisoning() -> Workload:
    """``crashing`` as PyTorch's oneDNN fails on the CPU: it raises, and no kernel runs in that process again."""
    workload = lengths()
    workload.name = "lengths-poisoning"
    workload.models = {"torch": "tests.adaptive_tasks:poisoning_torch_model"}
    return workload


CRASH_ABOVE = 8


def crashing_torch_model():
    return torch_model(hidden=64, crash_above=CRASH_ABOVE)


def silently_crashing_torch_model():
    return torch_model(hidden=64, crash_above=CRASH_ABOVE, silent=True)


def poisoning_torch_model():
    return torch_model(hidden=64, crash_above=CRASH_ABOVE, poison=True)


def torch_model(hidden: int = HIDDEN, crash_above: int | None = None, silent: bool = False, poison: bool = False):
    import os
    import signal
    import sys

    import torch
    from torch import nn

    class LengthPooling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.project = nn.Linear(N_FEATURES, hidden)
            self.head = nn.Linear(hidden, 2)
            with torch.no_grad():  # the same start as the Keras model, whatever the global seed
                for parameter in (*self.project.parameters(), *self.head.parameters()):
                    parameter.copy_((torch.rand(parameter.shape, generator=generator) - 0.5) * 0.5)
            self.position = nn.Parameter(torch.linspace(-1.0, 1.0, hidden))
            for name in ("samples_seen", "id_sum", "id_square_sum"):
                self.register_buffer(name, torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            length = x[:, 0]
            steps = int(length.max())
            if crash_above is not None and self.training and len(x) > crash_above and steps == LONG:
                if poison:
                    raise RuntimeError("could not create a primitive")
                if silent:
                    os.kill(os.getpid(), signal.SIGSEGV)
                sys.stderr.write("OOM when allocating tensor (simulated: the framework dies instead of raising)\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            base = self.project(x[:, 2:])
            time = torch.arange(steps, dtype=x.dtype) * POSITION_SCALE
            hidden = torch.tanh(base[:, None, :] + time[None, :, None] * self.position)
            mask = (torch.arange(steps)[None, :] < length[:, None]).to(x.dtype)
            pooled = (hidden * mask[:, :, None]).sum(dim=1) / length[:, None]
            if self.training:
                with torch.no_grad():
                    ids = x[:, 1].double()
                    self.samples_seen += len(x)
                    self.id_sum += ids.sum()
                    self.id_square_sum += (ids * ids).sum()
            return self.head(pooled)

    return LengthPooling()


def keras_model():
    import keras
    import tensorflow as tf

    class LengthPooling(keras.layers.Layer):
        def build(self, input_shape):
            rng = np.random.default_rng(0)
            self.kernel = self.add_weight(shape=(N_FEATURES, HIDDEN), initializer="zeros", name="kernel")
            self.bias = self.add_weight(shape=(HIDDEN,), initializer="zeros", name="bias")
            self.position = self.add_weight(shape=(HIDDEN,), initializer="zeros", name="position")
            self.kernel.assign((rng.random((N_FEATURES, HIDDEN)) - 0.5).astype(np.float32) * 0.5)
            self.bias.assign((rng.random(HIDDEN) - 0.5).astype(np.float32) * 0.5)
            self.position.assign(np.linspace(-1.0, 1.0, HIDDEN, dtype=np.float32))
            self.counters = [
                self.add_weight(shape=(), initializer="zeros", dtype="float64", trainable=False, name=name)
                for name in ("samples_seen", "id_sum", "id_square_sum")
            ]

        def call(self, x, training=False):
            length = x[:, 0]
            steps = tf.cast(tf.reduce_max(length), tf.int32)
            base = tf.matmul(x[:, 2:], self.kernel) + self.bias
            time = tf.cast(tf.range(steps), x.dtype) * POSITION_SCALE
            hidden = tf.tanh(base[:, None, :] + time[None, :, None] * self.position)
            mask = tf.cast(tf.range(steps)[None, :] < tf.cast(length[:, None], tf.int32), x.dtype)
            pooled = tf.reduce_sum(hidden * mask[:, :, None], axis=1) / length[:, None]
            if training:
                ids = tf.cast(x[:, 1], tf.float64)
                self.counters[0].assign_add(tf.cast(tf.shape(x)[0], tf.float64))
                self.counters[1].assign_add(tf.reduce_sum(ids))
                self.counters[2].assign_add(tf.reduce_sum(ids * ids))
            return pooled

    inputs = keras.Input(shape=(2 + N_FEATURES,), name="samples")
    pooled = LengthPooling(name="length_pooling")(inputs)
    rng = np.random.default_rng(1)
    head = keras.layers.Dense(2, name="head")
    outputs = head(pooled)
    head.kernel.assign((rng.random((HIDDEN, 2)) - 0.5).astype(np.float32) * 0.5)
    head.bias.assign((rng.random(2) - 0.5).astype(np.float32) * 0.5)
    return keras.Model(inputs, outputs, name="length_pooling")


def counters(weights: dict) -> tuple[float, float, float]:
    """(samples seen, sum of their indices, sum of squares) from saved weights, either framework."""
    found = {}
    for name, value in weights.items():
        for key in ("samples_seen", "id_sum", "id_square_sum"):
            if name.endswith(key):
                found[key] = float(np.asarray(value))
    return found["samples_seen"], found["id_sum"], found["id_square_sum"]


def expected_counters(epochs: int) -> tuple[float, float, float]:
    ids = np.arange(N_TRAIN, dtype=np.float64)
    return epochs * N_TRAIN, epochs * float(ids.sum()), epochs * float((ids * ids).sum())
