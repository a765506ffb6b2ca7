"""What a trial trains with in TensorFlow: a task's model, optimizer, loss and data, made once.

A :class:`~autobatch.tasks.workload.Workload` names its loss and optimizer (``make_loss``,
``make_optimizer``); a :class:`~autobatch.tasks.keras_task.KerasTask`'s model comes compiled, and
its loss is Keras's own (:func:`compiled_loss`), its optimizer a fresh one of the compiled class
and settings at the trial's learning rate (:func:`fresh_optimizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.backends.tensorflow.data import ArrayData, SampleData, read_keras_data
from autobatch.backends.tensorflow.precision import MixedPrecision
from autobatch.errors import InvalidParameterError
from autobatch.tasks.keras_task import KerasTask
from autobatch.tasks.workload import Workload

__all__ = [
    "KerasTraining",
    "PerSampleLoss",
    "build_training",
    "check_compiled",
    "compiled_loss",
    "fresh_optimizer",
    "make_loss",
    "make_optimizer",
    "per_sample_loss",
]

#: ``(y_true, predictions) -> (batch,)``: one loss value per sample
PerSampleLoss = Callable[[Any, Any], Any]

_COMPILED = "must be a callable returning a compiled keras.Model; call model.compile(optimizer=..., loss=...) in it"


@dataclass
class KerasTraining:
    """A task's model, optimizer, loss and data, built for one trial or training session.

    ``loss`` is a per-sample loss (a workload's), or ``None``: the model's compiled loss
    (:func:`compiled_loss`). ``optimizer_name`` is the optimizer's class, inside any loss scaling.
    """

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    loss: PerSampleLoss | None
    optimizer_name: str
    train: SampleData
    val: SampleData


def build_training(task: Workload | KerasTask, learning_rate: float, precision: MixedPrecision) -> KerasTraining:
    """Build ``task``'s model (under ``precision``'s policy), its optimizer at ``learning_rate``, its loss and data."""
    if isinstance(task, Workload):
        with precision.policy_scope():
            model = task.build_model("tensorflow")
        optimizer = make_optimizer(task.optimizer, learning_rate)
        return KerasTraining(
            model,
            precision.wrap(optimizer),
            make_loss(task.loss),
            type(optimizer).__name__,
            ArrayData(task.x_train, task.y_train),
            ArrayData(task.x_val, task.y_val),
        )
    if not isinstance(task, KerasTask):
        raise InvalidParameterError(
            "task", type(task).__name__, "must be an autobatch.KerasTask or a Workload to run on the tensorflow backend"
        )
    with precision.policy_scope():
        model = task.model()
    check_compiled(model)
    optimizer = fresh_optimizer(model.optimizer, learning_rate)
    options = {
        "padded_shapes": task.padded_shapes,
        "padding_value": task.padding_value,
        "sample_size": task.sample_size,
    }
    train = read_keras_data("train_data", task.train_data, **options)
    val = read_keras_data("val_data", task.val_data, **options)
    if not model.built or not model.trainable_variables:  # a subclassed model is built by its first call
        model(train.batch(np.arange(min(2, train.n)))[0])
    return KerasTraining(model, precision.wrap(optimizer), None, type(optimizer).__name__, train, val)


def check_compiled(model: Any) -> None:
    """Fail with a one-line error naming ``model`` unless it is a keras.Model compiled with an optimizer."""
    if not isinstance(model, keras.Model):
        raise InvalidParameterError("model", f"a factory returning {type(model).__name__}", _COMPILED)
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise InvalidParameterError("model", f"a factory returning an uncompiled {type(model).__name__}", _COMPILED)


def fresh_optimizer(compiled: keras.optimizers.Optimizer, learning_rate: float) -> keras.optimizers.Optimizer:
    """A new optimizer of ``compiled``'s class and settings (AdamW's weight decay, clipping, ...) at ``learning_rate``.

    The compiled one may already hold state, and under ``mixed_float16`` Keras wraps it in a
    LossScaleOptimizer: its inner optimizer is copied, and the trial adds its own loss scaling.
    Keras's own ``gradient_accumulation_steps`` is dropped: the trial's windows accumulate.
    """
    inner = getattr(compiled, "inner_optimizer", compiled)
    config = {**inner.get_config(), "learning_rate": float(learning_rate)}
    if "gradient_accumulation_steps" in config:
        config["gradient_accumulation_steps"] = None
    return type(inner).from_config(config)


def compiled_loss(model: keras.Model, x: Any, y: Any, predictions: Any, training: bool) -> tf.Tensor:
    """The model's loss as ``fit`` computes it: the compiled loss and the layers' regularisation losses, in float32.

    Through ``Trainer._compute_loss`` where it exists, as Keras's own ``train_step`` calls it:
    it also takes a ``compute_loss`` override written before Keras 3.3 without ``training``.
    """
    compute = getattr(model, "_compute_loss", None) or model.compute_loss
    return tf.cast(compute(x=x, y=y, y_pred=predictions, training=training), tf.float32)


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
