"""Keras tasks for the TensorFlow backend's tests, importable by a worker (``tests.keras_task_tasks:text_task``).

Sequences of varying length whose label is told by their tokens: a token below ``VOCAB // 2``
counts for class 0, above for class 1, and the class is the majority. The model embeds with
``mask_zero=True`` and pools over the mask, so padding (token 0) changes no prediction, and its
dense kernel has an L2 regulariser, so ``model.losses`` is not empty.
"""

from __future__ import annotations

import numpy as np

from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.tasks.keras_task import KerasTask

VOCAB = 32
SHORTEST, LONGEST = 2, 24
N_TRAIN, N_VAL = 192, 48


def sequences(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` token sequences (ids 1..VOCAB-1) of lengths SHORTEST..LONGEST, and their majority class."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SHORTEST, LONGEST + 1, size=n)
    lengths[0] = LONGEST  # the longest is always there: the worst-case size is known
    tokens = [rng.integers(1, VOCAB, size=length).astype(np.int32) for length in lengths]
    labels = np.array([int(np.mean(t >= VOCAB // 2) > 0.5) for t in tokens], dtype=np.int64)
    return tokens, labels


def sequence_dataset(n: int, seed: int) -> tf.data.Dataset:
    """An unbatched tf.data pipeline of ``({"tokens": (length,)}, label)`` elements."""
    tokens, labels = sequences(n, seed)
    return tf.data.Dataset.from_generator(
        lambda: (({"tokens": t}, label) for t, label in zip(tokens, labels, strict=True)),
        output_signature=({"tokens": tf.TensorSpec((None,), tf.int32)}, tf.TensorSpec((), tf.int64)),
    )


def text_model(optimizer=None, regularization: float = 0.01, compile: bool = True) -> keras.Model:
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    hidden = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(tokens)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    hidden = keras.layers.Dense(16, activation="tanh", kernel_regularizer=keras.regularizers.L2(regularization))(hidden)
    model = keras.Model({"tokens": tokens}, keras.layers.Dense(2)(hidden))
    if compile:
        model.compile(
            optimizer=optimizer or keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return model


def text_task() -> KerasTask:
    """A compiled model with AdamW and weight decay, on tf.data pipelines of variable-length sequences."""
    return KerasTask(
        model=text_model,
        train_data=sequence_dataset(N_TRAIN, seed=0),
        val_data=sequence_dataset(N_VAL, seed=1),
        base_batch_size=16,
        base_learning_rate=1e-2,
        name="keras-text-test",
    )


def uncompiled_task() -> KerasTask:
    return KerasTask(
        model=lambda: text_model(compile=False),
        train_data=sequence_dataset(16, seed=0),
        val_data=sequence_dataset(8, seed=1),
    )


class Batches(keras.utils.PyDataset):
    """Fixed-length sequences in batches of 16 (the last one short), as a PyDataset serves them."""

    def __init__(self, n: int, seed: int, length: int = 12):
        super().__init__()
        tokens, _ = sequences(n, seed)
        self.x = np.stack([np.resize(t, length) for t in tokens])
        self.y = np.array([int(np.mean(row >= VOCAB // 2) > 0.5) for row in self.x], dtype=np.int64)

    def __len__(self) -> int:
        return -(-len(self.y) // 16)

    def __getitem__(self, index: int):
        rows = slice(index * 16, (index + 1) * 16)
        return {"tokens": self.x[rows]}, self.y[rows]


def py_dataset_task() -> KerasTask:
    return KerasTask(
        model=lambda: text_model(optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)),
        train_data=Batches(100, seed=2),
        val_data=Batches(40, seed=3),
        name="keras-pydataset-test",
    )
