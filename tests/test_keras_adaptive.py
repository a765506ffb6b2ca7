"""Keras: ``fit_adaptive`` and ``make_adaptive_train_step`` train, and a run that splits its windows
ends with the weights of a run that used the small micro-batch from the start.

The model's ``Greedy`` layer is the identity, except that in training a micro-batch of more
than ``LIMIT`` samples that holds a marked sample asks numpy for an allocation no machine
can give (a petabyte): a real allocation failure, which TensorFlow's ``py_function`` turns
into a real ``ResourceExhaustedError``, raised from inside the traced step as an OOM in a
kernel would be. (A real tensor that large makes TensorFlow's allocator wait 10 s before it
gives up; this fails at once.) Only the windows that hold a marked sample split, and the
layer counts the samples its training passes saw, so a failed attempt that was not rolled
back shows. SGD is linear in the gradients: the two runs differ by float rounding alone.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from autobatch.backends.tensorflow import batch_spec, fit_adaptive, make_adaptive_train_step  # noqa: E402
from autobatch.backends.tensorflow._framework import keras, tf  # noqa: E402

N_TRAIN = 96
LIMIT = 4
MARKED = (10, 53, 90)  # training samples whose micro-batch must stay at LIMIT or below


def _allocate(size, marked):
    if int(size) > LIMIT and bool(marked):
        np.empty(int(size) << 50, dtype=np.uint8)  # raises numpy's MemoryError: no address space is that large
    return np.float32(0.0)


class Greedy(keras.layers.Layer):
    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", dtype="float64", trainable=False, name="seen")

    def call(self, x, training=False):
        if not training:
            return x
        marked = tf.reduce_any(x[:, 0] > 5.0)
        zero = tf.py_function(_allocate, [tf.shape(x)[0], marked], tf.float32)
        zero.set_shape(())
        self.seen.assign_add(tf.cast(tf.shape(x)[0], tf.float64))
        return x + zero


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN + 32, 4)).astype(np.float32)
    y = (x[:, 1] + 0.5 * x[:, 2] > 0).astype(np.int64)
    x[:, 0] = np.clip(x[:, 0], -3, 3)
    x[list(MARKED), 0] = 9.0  # the marker: a feature the model still learns from
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(16, activation="tanh")(Greedy(name="greedy")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _seen(model) -> float:
    return float(model.get_layer("greedy").seen.numpy())


def _assert_same_weights(a, b):
    for wa, wb in zip(a.trainable_weights, b.trainable_weights, strict=True):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=1e-5, atol=1e-6, err_msg=wa.path)


@pytest.mark.slow
def test_fit_adaptive_trains_and_a_split_run_ends_with_the_small_micro_batch_weights():
    x, y, x_val, y_val = _data()
    options = dict(batch_size=16, epochs=3, seed=2, validation_data=(x_val, y_val))
    adapted = _model()
    history = fit_adaptive(adapted, x, y, micro_batch_size=16, grow_after=2, **options)
    small = _model()
    reference = fit_adaptive(small, x, y, micro_batch_size=LIMIT, **options)

    assert reference["adaptations"] == []  # LIMIT never runs out of memory
    causes = [a["cause"] for a in history["adaptations"]]
    assert causes.count("oom") >= 2 and "grow" in causes  # split, grew back, split again
    assert all(a["effective_batch_size"] == 16 for a in history["adaptations"])
    # It trains: the loss falls, the validation loss is measured every epoch.
    assert len(history["loss"]) == len(history["val_loss"]) == 3
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    # No sample lost or seen twice, and the same weights as the small micro-batch from the start.
    assert _seen(adapted) == _seen(small) == 3 * N_TRAIN
    _assert_same_weights(adapted, small)
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["val_loss"], reference["val_loss"], rtol=1e-5)


@pytest.mark.slow
def test_make_adaptive_train_step_redoes_a_window_in_the_same_traced_graph():
    x, y, _, _ = _data()
    order = np.random.default_rng(5).permutation(N_TRAIN)
    windows = [order[start : start + 24] for start in range(0, N_TRAIN, 24)]

    def run(micro: int):
        model = _model()
        step = make_adaptive_train_step(
            model,
            model.optimizer,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
            micro_batch_size=micro,
            x_spec=batch_spec(x),
            y_spec=batch_spec(y),
        )
        losses = [step(x[indices], y[indices]) for indices in windows]
        return model, step, losses

    adapted, step, losses = run(12)
    small, small_step, small_losses = run(LIMIT)
    assert small_step.adaptations == []
    # 12 fails in the windows with a marked sample (from their first or second micro-batch on),
    # then 6; the size never grows back without grow_after.
    assert [(a.old_micro_batch, a.new_micro_batch) for a in step.adaptations] == [(12, 6), (6, 3)]
    assert step.micro_batch_size == 3
    assert step.trainer.trace_counts["accumulate"] == 1  # every size ran the one traced graph
    assert _seen(adapted) == _seen(small) == N_TRAIN
    _assert_same_weights(adapted, small)
    np.testing.assert_allclose(losses, small_losses, rtol=1e-5)
