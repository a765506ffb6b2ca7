"""TensorFlow micro-batching: one GradientTape per micro-batch, one optimizer step per window.

:class:`MicroBatchTrainer` compiles two ``tf.function``\\ s once: ``accumulate`` runs
one micro-batch under its own ``GradientTape`` and adds its gradients, weighted by the
micro-batch's share of the window's samples, into non-trainable ``tf.Variable``
accumulators; ``apply`` steps the optimizer once per window and zeroes them. Only
one micro-batch's activations are alive at a time, which is what saves memory (one
tape around all micro-batches would keep every activation until the end). The batch
dimension of the traced signature is ``None``, so a short last micro-batch runs the
same graph: no retrace, no padding; so are the dimensions of a sequence whose length
varies (see :mod:`autobatch.backends.tensorflow.data`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from autobatch.backends._trial import mean_loss_in_batches
from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.backends.tensorflow.data import SampleData
from autobatch.backends.tensorflow.training import PerSampleLoss, compiled_loss, make_loss

__all__ = ["MicroBatchTrainer", "batch_length"]


class MicroBatchTrainer:
    """Gradient accumulation for a Keras model: one tape per micro-batch, one optimizer step per window.

    Use it from your own loop::

        trainer = MicroBatchTrainer(model, keras.optimizers.Adam(1e-3), "cross_entropy")
        loss = trainer.train_window([(x1, y1), (x2, y2), (x3, y3)])

    or call :meth:`accumulate` per micro-batch with its share of the window's samples
    and :meth:`apply` once per window. ``loss`` is a per-sample loss ``(y, predictions) ->
    (batch,)`` (or a workload's loss name), the model's ``losses`` added; or ``None``: the
    model's compiled loss through ``model.compute_loss``, its regularisation losses
    included, which must be a mean over the batch (Keras's ``"sum_over_batch_size"``).
    ``x`` may be a dict or a tuple of tensors. ``x_spec``/``y_spec`` fix the traced signature
    (give the batch dimension as ``None``, see :func:`autobatch.backends.tensorflow.data.batch_spec`);
    without them the functions generalise their shapes after the first distinct one, so at
    most a second trace. :attr:`trace_counts` tells how often each function was traced.
    ``measure_noise`` also records, per window, the squared norms of the micro-batch
    gradients and of the window's (:meth:`last_noise_norms`), for :mod:`autobatch.core.noise`.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss: str | PerSampleLoss | None,
        *,
        x_spec: Any = None,
        y_spec: Any = None,
        measure_noise: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.measures_noise = measure_noise
        self.loss_fn: PerSampleLoss | None = make_loss(loss) if isinstance(loss, str) else loss
        self.trace_counts = {"accumulate": 0, "apply": 0, "evaluate": 0}
        self._variables = list(model.trainable_variables)
        if not self._variables:
            raise ValueError("model has no trainable variables; build it (keras.Input) before making a trainer")
        if not optimizer.built:
            optimizer.build(self._variables)
        self._accumulators = [
            tf.Variable(tf.zeros(v.shape, dtype=v.dtype), trainable=False, name="grad_accumulator")
            for v in self._variables
        ]
        self._window_loss = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="window_loss")
        if measure_noise:
            self._micro_sq_sum = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="micro_grad_sq_sum")
            self._micro_count = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="micro_batch_count")
            self._noise_norms = tf.Variable([0.0, 0.0], dtype=tf.float32, trainable=False, name="noise_norms")

        if x_spec is not None and y_spec is not None:
            share_spec = tf.TensorSpec((), tf.float32)
            self.accumulate = tf.function(self._accumulate, input_signature=[x_spec, y_spec, share_spec])
            self._evaluate_batch = tf.function(self._loss_sum, input_signature=[x_spec, y_spec])
        else:
            self.accumulate = tf.function(self._accumulate, reduce_retracing=True)
            self._evaluate_batch = tf.function(self._loss_sum, reduce_retracing=True)
        self.apply = tf.function(self._apply)

    @property
    def trace_count(self) -> int:
        """Traces of the training functions (``accumulate`` + ``apply``); 2 after any number of windows."""
        return self.trace_counts["accumulate"] + self.trace_counts["apply"]

    @property
    def accumulated_gradients(self) -> list:
        """The gradients summed since the last :meth:`apply` (scaled, under a LossScaleOptimizer)."""
        return [accumulator.read_value() for accumulator in self._accumulators]

    def last_noise_norms(self) -> tuple[float, float]:
        """The last window's (mean squared norm of its micro-batch gradients, squared norm of its gradient)."""
        micro_sq, window_sq = self._noise_norms.numpy().tolist()
        return float(micro_sq), float(window_sq)

    def train_window(self, micro_batches: Iterable[tuple[Any, Any]]) -> float:
        """One optimizer step over ``micro_batches`` [(x, y), ...]; returns the window's mean loss."""
        micro_batches = list(micro_batches)
        total = sum(batch_length(x) for x, _ in micro_batches)
        for x, y in micro_batches:
            self.accumulate(x, y, tf.constant(batch_length(x) / total, tf.float32))
        return float(self.apply())

    def set_learning_rate(self, learning_rate: float) -> None:
        """Train the next windows at ``learning_rate`` (a learning-rate schedule's step).

        It is assigned to the optimizer's learning-rate variable (a LossScaleOptimizer's inner one),
        which the traced :meth:`apply` reads when it runs: nothing is traced again.
        """
        self.optimizer.learning_rate = learning_rate

    def reset_window(self) -> None:
        """Zero the gradient accumulators and the window loss: the window starts again."""
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        self._window_loss.assign(0.0)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int, limit: int | None = None) -> float:
        """Mean per-sample loss over the first ``limit`` samples (all when ``None``), each weighing the same."""
        return mean_loss_in_batches(
            len(y), batch_size, limit, lambda start, stop: float(self._evaluate_batch(x[start:stop], y[start:stop]))
        )

    def evaluate_data(self, data: SampleData, batch_size: int, limit: int | None = None) -> float:
        """Mean per-sample loss over the first ``limit`` samples of ``data`` (all when ``None``), longest first
        where sizes vary (:meth:`SampleData.evaluation_order`), each sample weighing the same."""
        order = data.evaluation_order(limit)
        return mean_loss_in_batches(
            len(order),
            batch_size,
            None,
            lambda start, stop: float(self._evaluate_batch(*data.batch(order[start:stop]))),
        )

    def _accumulate(self, x, y, share):
        """Gradients of one micro-batch's mean loss × ``share``, added into the accumulators."""
        self.trace_counts["accumulate"] += 1  # runs only while tracing
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            if self.loss_fn is None:  # regularisation is in compute_loss: the shares sum to 1, so once per window
                loss = compiled_loss(self.model, x, y, predictions, training=True) * share
            else:
                loss = tf.reduce_mean(self.loss_fn(y, predictions)) * share
                if self.model.losses:  # regularisers: the shares sum to 1, so once per window in all
                    loss += tf.add_n([tf.cast(extra, tf.float32) for extra in self.model.losses]) * share
            scaled = self.optimizer.scale_loss(loss)  # a LossScaleOptimizer scales; others pass it through
        gradients = tape.gradient(scaled, self._variables)
        for accumulator, gradient in zip(self._accumulators, gradients, strict=True):
            if gradient is None:
                continue
            if isinstance(gradient, tf.IndexedSlices):
                accumulator.scatter_add(
                    tf.IndexedSlices(
                        tf.cast(gradient.values, accumulator.dtype), gradient.indices, gradient.dense_shape
                    )
                )
            else:
                accumulator.assign_add(tf.cast(gradient, accumulator.dtype))
        if self.measures_noise:
            # The gradient of this micro-batch's mean loss is the tape's divided by share × loss scale.
            squared = _squared_norm(gradients)
            self._micro_sq_sum.assign_add(squared / tf.square(share * self._loss_scale()))
            self._micro_count.assign_add(1.0)
        self._window_loss.assign_add(loss)
        return loss

    def _apply(self):
        """One optimizer step with the accumulated gradients, then zero them; returns the window's loss."""
        self.trace_counts["apply"] += 1
        gradients = [accumulator.read_value() for accumulator in self._accumulators]
        if self.measures_noise:  # before the step, which may change the loss scale
            window_sq = _squared_norm(gradients) / tf.square(self._loss_scale())
            micro_sq = self._micro_sq_sum.read_value() / tf.maximum(self._micro_count.read_value(), 1.0)
            self._noise_norms.assign(tf.stack([micro_sq, window_sq]))
            self._micro_sq_sum.assign(0.0)
            self._micro_count.assign(0.0)
        # A LossScaleOptimizer unscales here, once, and skips the step if any gradient is not finite.
        self.optimizer.apply_gradients(zip(gradients, self._variables, strict=True))
        window_loss = self._window_loss.read_value()
        self.reset_window()
        return window_loss

    def _loss_scale(self):
        """What the loss, and so every gradient, is multiplied by: a LossScaleOptimizer's scale, else 1."""
        return tf.cast(self.optimizer.scale_loss(tf.constant(1.0, tf.float32)), tf.float32)

    def _loss_sum(self, x, y):
        self.trace_counts["evaluate"] += 1
        predictions = self.model(x, training=False)
        if self.loss_fn is None:  # a mean over the batch: times its samples, each weighs the same
            count = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
            return compiled_loss(self.model, x, y, predictions, training=False) * count
        return tf.reduce_sum(self.loss_fn(y, predictions))


def batch_length(x: Any) -> int:
    """The samples in a batch ``x`` (an array or tensor, or a dict or tuple of them)."""
    return int(tf.nest.flatten(x)[0].shape[0])


def _squared_norm(gradients) -> tf.Tensor:
    """Σ |g|² over a list of gradients, in float32 (a sparse one is summed into its dense form first)."""
    total = tf.constant(0.0, tf.float32)
    for gradient in gradients:
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):  # repeated indices add up before squaring
            gradient = tf.convert_to_tensor(gradient)
        total += tf.reduce_sum(tf.square(tf.cast(gradient, tf.float32)))
    return total
