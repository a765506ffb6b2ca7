"""keras-text: a small Keras transformer classifying token sequences of varying length, fed by tf.data.

The model is built from its configuration (:data:`MODEL_CONFIG`) with random weights: token
and position embeddings, one encoder block (multi-head self-attention and a feed-forward
layer, each with a residual and a LayerNorm), a masked mean over the tokens and a Dense layer
of logits. It is compiled with ``keras.optimizers.AdamW`` and
``SparseCategoricalCrossentropy(from_logits=True)``, as a Keras user would.

The data is an **unbatched** ``tf.data.Dataset`` of ``(tokens, label)`` elements of 8 to 96
tokens: autobatch cuts the batches and pads each micro-batch to its longest element with 0,
which the model masks. Tokens 1..63 fall in four groups of 15 (and three tokens of no group);
a sequence leans towards one group, and its class is the group that occurs most often in it,
a property a model learns by attending over the whole sequence, not from any one position.
Memory grows with the longest sequence of a batch (attention is quadratic in it), which
autobatch finds from the elements without being told.

Nothing here imports TensorFlow or Keras until the data or the model is made.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from autobatch.tasks.keras_task import KerasTask

VOCAB_SIZE = 64
PAD_ID = 0
N_CLASSES = 4
GROUP_SIZE = 15  # tokens 1..60 form the four class groups; 61..63 belong to none
MIN_LENGTH, MAX_LENGTH = 8, 96
TRAIN_SAMPLES = 2048
VAL_SAMPLES = 256
#: how much of a sequence comes from its leaning group; the rest is drawn from the whole vocabulary
LEANING = 0.1
WEIGHT_DECAY = 0.01

#: the model, as a configuration: what a Keras user would keep in a config file
MODEL_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "max_length": MAX_LENGTH,
    "model_dim": 64,
    "num_heads": 4,
    "feed_forward_dim": 128,
    "num_blocks": 1,
    "num_classes": N_CLASSES,
}


def keras_text() -> KerasTask:
    train, val = token_split()
    return KerasTask(
        model=text_transformer,
        train_data=text_dataset(*train),
        val_data=text_dataset(*val),
        padding_value=PAD_ID,
        base_batch_size=32,
        base_learning_rate=1e-3,
        name="keras-text",
        description=(
            f"Keras transformer ({MODEL_CONFIG['num_blocks']} block, dim {MODEL_CONFIG['model_dim']}, "
            f"{MODEL_CONFIG['num_heads']} heads) classifying tf.data token sequences of "
            f"{MIN_LENGTH}-{MAX_LENGTH} tokens into {N_CLASSES} classes; AdamW (weight decay {WEIGHT_DECAY})"
        ),
    )


def text_transformer(config: dict | None = None) -> Any:
    """The compiled classifier built from ``config`` (default :data:`MODEL_CONFIG`)."""
    import keras
    from keras import layers, ops

    config = {**MODEL_CONFIG, **(config or {})}
    dim = config["model_dim"]
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    padding_mask = ops.not_equal(tokens, PAD_ID)  # (batch, length): True on real tokens
    # Positions 0, 1, 2, ... of each token, by a running count: works for a length unknown until run time.
    positions = ops.cumsum(ops.ones_like(tokens), axis=1) - 1
    x = layers.Embedding(config["vocab_size"], dim, name="token_embedding")(tokens)
    x = x + layers.Embedding(config["max_length"], dim, name="position_embedding")(positions)
    attention_mask = ops.expand_dims(padding_mask, axis=1)  # (batch, 1, length): no query attends to padding
    for block in range(config["num_blocks"]):
        attended = layers.MultiHeadAttention(
            config["num_heads"], dim // config["num_heads"], name=f"attention_{block}"
        )(x, x, attention_mask=attention_mask)
        x = layers.LayerNormalization(name=f"attention_norm_{block}")(x + attended)
        hidden = layers.Dense(config["feed_forward_dim"], activation="gelu", name=f"feed_forward_{block}")(x)
        x = layers.LayerNormalization(name=f"feed_forward_norm_{block}")(x + layers.Dense(dim)(hidden))
    pooled = layers.GlobalAveragePooling1D(name="mean_over_tokens")(x, mask=padding_mask)
    logits = layers.Dense(config["num_classes"], name="logits")(pooled)
    model = keras.Model(tokens, logits, name="text_transformer")
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=WEIGHT_DECAY),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def text_dataset(sequences: list[np.ndarray], labels: np.ndarray) -> Any:
    """An unbatched ``tf.data.Dataset`` of ``(tokens, label)``: int32 tokens of varying length, an int32 label."""
    import tensorflow as tf

    # Every sequence end to end, and where each starts: elements are sliced from it as dense tensors
    # (a ragged tensor's slices would be ragged elements, which padded_batch does not take).
    flat = tf.constant(np.concatenate(sequences), dtype=tf.int32)
    starts = tf.constant(np.concatenate([[0], np.cumsum([len(sequence) for sequence in sequences])]), dtype=tf.int64)
    targets = tf.constant(labels, dtype=tf.int32)
    return tf.data.Dataset.range(len(sequences)).map(
        lambda index: (flat[starts[index] : starts[index + 1]], targets[index])
    )


@lru_cache(maxsize=1)
def token_split(seed: int = 2024) -> tuple[tuple[list[np.ndarray], np.ndarray], tuple[list[np.ndarray], np.ndarray]]:
    """((train sequences, labels), (val sequences, labels)); a label is the group most frequent in its sequence."""
    rng = np.random.default_rng(seed)
    sequences, labels = [], []
    for length in rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=TRAIN_SAMPLES + VAL_SAMPLES):
        leaning = rng.integers(N_CLASSES)
        from_group = rng.random(length) < LEANING
        sequence = np.where(
            from_group,
            1 + leaning * GROUP_SIZE + rng.integers(GROUP_SIZE, size=length),
            rng.integers(1, VOCAB_SIZE, size=length),
        ).astype(np.int32)
        group = (sequence - 1) // GROUP_SIZE  # N_CLASSES (no group) for tokens past the last group
        counts = np.bincount(group[group < N_CLASSES], minlength=N_CLASSES)
        sequences.append(sequence)
        labels.append(int(np.argmax(counts)))  # ties go to the lower group: still a function of the sequence
    split = TRAIN_SAMPLES
    return (sequences[:split], np.array(labels[:split])), (sequences[split:], np.array(labels[split:]))
