"""The optimizers and losses a workload names, made for Keras on TensorFlow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobatch.backends.tensorflow._framework import keras, tf

__all__ = ["PerSampleLoss", "make_loss", "make_optimizer", "per_sample_loss"]

#: ``(y_true, predictions) -> (batch,)``: one loss value per sample
PerSampleLoss = Callable[[Any, Any], Any]


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        # torch's default epsilon, so both frameworks run the same update rule
        return keras.optimizers.Adam(learning_rate=learning_rate, epsilon=1e-8)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    raise ValueError(f"optimizer={name!r} is not supported by the tensorflow backend; allowed: 'adam', 'sgd'")


def make_loss(name: str) -> PerSampleLoss:
    """A per-sample loss ``(y_true, predictions) -> (batch,)`` in float32."""
    if name == "cross_entropy":
        return _cross_entropy
    if name == "mse":
        return _mean_squared_error
    raise ValueError(f"loss={name!r} is not supported by the tensorflow backend; allowed: 'cross_entropy', 'mse'")


def per_sample_loss(loss) -> PerSampleLoss:
    """A compiled Keras loss as a function ``(y_true, predictions) -> (batch,)``."""
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # the unreduced per-sample values
    if callable(loss):
        return loss
    raise ValueError(f"loss={loss!r}: fit_adaptive needs one loss (a name, a keras.losses.Loss or a function)")


def _cross_entropy(y_true, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_true, logits=tf.cast(logits, tf.float32))


def _mean_squared_error(y_true, predictions):
    y_true = tf.cast(y_true, tf.float32)
    predictions = tf.reshape(tf.cast(predictions, tf.float32), tf.shape(y_true))
    squared = tf.square(predictions - y_true)
    rank = len(squared.shape)
    return tf.reduce_mean(squared, axis=list(range(1, rank))) if rank > 1 else squared
