"""TensorFlow micro-batching: one GradientTape per micro-batch, one optimizer step per window.

:class:`MicroBatchTrainer` traces each of its training functions once: ``accumulate`` runs
one micro-batch under its own ``GradientTape`` and adds its gradients, weighted by the
micro-batch's share of the window's samples, into non-trainable ``tf.Variable``
accumulators; ``finish`` does the same for a window's last micro-batch and then, in the
same call, steps the optimizer once and zeroes them (``apply`` steps alone, for a loop that
adds its micro-batches first); a window of one micro-batch is one ``step``, with no
accumulators at all. Only one micro-batch's activations are alive at a time, which is what
saves memory (one tape around all micro-batches would keep every activation until the end).
The batch dimension of the traced signature is ``None``, so a short last micro-batch runs the
same graph: no retrace, no padding; so are the dimensions of a sequence whose length varies
(see :mod:`autobatch.backends.tensorflow.data`).

Speed: a window costs one call of a traced function per micro-batch and nothing else. With a
signature given, each function is called as its concrete function, whose call costs about a
third of a ``tf.function``'s (measured on TensorFlow 2.21, CPU: ~50 µs against ~150 µs, which
a small model's micro-batch notices); the gradient-noise norms are computed inside those same
calls, behind a flag each call takes (a ``tf.cond``: both branches are in the one trace, so a
window that does not measure pays for no norm and nothing is traced again), and summed on the
device over the windows, read back once, at the end of a trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
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

    or call :meth:`accumulate` per micro-batch with its share of the window's samples and
    :meth:`finish` with the last one (or :meth:`apply` after the last one). ``loss`` is a
    per-sample loss ``(y, predictions) -> (batch,)`` (or a workload's loss name), the model's
    ``losses`` added; or ``None``: the model's compiled loss through ``model.compute_loss``,
    its regularisation losses included, which must be a mean over the batch (Keras's
    ``"sum_over_batch_size"``). ``x`` may be a dict or a tuple of tensors. ``x_spec``/``y_spec``
    fix the traced signature (give the batch dimension as ``None``, see
    :func:`autobatch.backends.tensorflow.data.batch_spec`); without them the functions generalise
    their shapes after the first distinct one, so at most a second trace. :attr:`trace_counts`
    tells, for each role, the most times one of its functions was traced (1: none was traced
    again): ``accumulate`` (a micro-batch's gradients added), ``apply`` (an optimizer step:
    :meth:`apply`, :meth:`finish` or :meth:`step`) and ``evaluate``.

    ``measure_noise`` also records, per window, the squared norms of the micro-batch gradients
    and of the window's (:meth:`last_noise_norms`; summed over the windows :meth:`finish` counts,
    :meth:`noise_totals`), for :mod:`autobatch.core.noise`: one reduction per variable and
    micro-batch, inside the same calls, in the windows whose calls are given ``measure=True``
    (the default; a trial measures the windows its :class:`~autobatch.core.noise.MeasuringBudget`
    allows, weighing :meth:`norm_seconds` against its windows: a small model's norms cost it 5-10 %
    of a window).
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
        self._traces: dict[str, int] = {}  # per traced function
        self._variables = list(model.trainable_variables)
        if not self._variables:
            raise ValueError("model has no trainable variables; build it (keras.Input) before making a trainer")
        if not optimizer.built:
            optimizer.build(self._variables)
        # Made before the first window of several micro-batches: windows of one never hold a copy of the model.
        self._accumulators: list[tf.Variable] | None = None
        self._window_loss = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="window_loss")
        self._scalars: dict[Any, tf.Tensor] = {}
        self._norm_pass: Callable | None = None
        if measure_noise:
            self._micro_sq_sum = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="micro_grad_sq_sum")
            self._micro_count = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="micro_batch_count")
            self._noise_norms = tf.Variable([0.0, 0.0], dtype=tf.float32, trainable=False, name="noise_norms")
            # Over the windows counted: (windows, windows left out as not finite, Σ micro-batch norm, Σ window norm).
            self._noise_totals = tf.Variable(tf.zeros(4, tf.float64), trainable=False, name="noise_totals")

        given = x_spec is not None and y_spec is not None
        share, flag = tf.TensorSpec((), tf.float32), tf.TensorSpec((), tf.bool)
        self._accumulate = _traced(self._accumulate_micro_batch, [x_spec, y_spec, share, flag] if given else None)
        self._finish = _traced(self._finish_window, [x_spec, y_spec, share, flag, flag] if given else None)
        self._step = _traced(self._step_window, [x_spec, y_spec] if given else None)
        self._apply = _traced(self._apply_accumulated, [])
        self._evaluate_batch = _traced(self._loss_sum, [x_spec, y_spec] if given else None)

    @property
    def trace_counts(self) -> dict[str, int]:
        """Per role, the most traces one of its functions took: ``accumulate``, ``apply`` and ``evaluate``."""
        roles = {"accumulate": 0, "apply": 0, "evaluate": 0}
        for name, count in self._traces.items():
            role = name.split(",")[0]
            roles[role] = max(roles[role], count)
        return roles

    @property
    def trace_count(self) -> int:
        """Traces of the training functions (``accumulate`` + ``apply``): one per function a loop calls."""
        return self.trace_counts["accumulate"] + self.trace_counts["apply"]

    @property
    def accumulated_gradients(self) -> list:
        """The gradients summed since the last step (scaled, under a LossScaleOptimizer)."""
        if self._accumulators is None:
            return [tf.zeros(variable.shape, variable.dtype) for variable in self._variables]
        return [accumulator.read_value() for accumulator in self._accumulators]

    def accumulate(self, x: Any, y: Any, share: Any, *, measure: bool = True) -> tf.Tensor:
        """Add the gradients of the micro-batch ``(x, y)``'s mean loss × ``share`` (its share of the window's samples).

        ``measure``: add its gradient's squared norm to the window's noise norms (with ``measure_noise``);
        give every call of one window the same.
        """
        self._make_accumulators()
        return self._accumulate(x, y, self.scalar(share), self.scalar(bool(measure)))

    def finish(self, x: Any, y: Any, share: Any, *, measure: bool = True, count_noise: bool = False) -> tf.Tensor:
        """:meth:`accumulate` the window's last micro-batch, then one optimizer step, in one call; the window's loss.

        ``measure``: the window's noise norms are recorded (:meth:`last_noise_norms`; with ``measure_noise``).
        ``count_noise``: a measured window's norms are also added to :meth:`noise_totals` (a window of
        micro-batches of one size; one with a short last micro-batch would give the estimate a third batch size).
        """
        self._make_accumulators()
        return self._finish(x, y, self.scalar(share), self.scalar(bool(measure)), self.scalar(bool(count_noise)))

    def step(self, x: Any, y: Any) -> tf.Tensor:
        """A window of one micro-batch: its gradients applied at once, no accumulators; its loss."""
        return self._step(x, y)

    def apply(self) -> tf.Tensor:
        """One optimizer step with the gradients :meth:`accumulate` added, then zero them; the window's loss."""
        self._make_accumulators()
        return self._apply()

    def train_window(self, micro_batches: Iterable[tuple[Any, Any]]) -> float:
        """One optimizer step over ``micro_batches`` [(x, y), ...]; returns the window's mean loss."""
        micro_batches = list(micro_batches)
        if len(micro_batches) == 1 and self._accumulators is None:  # else finish runs it, traced already
            return float(self.step(*micro_batches[0]))
        sizes = [batch_length(x) for x, _ in micro_batches]
        total = sum(sizes)
        for (x, y), size in zip(micro_batches[:-1], sizes, strict=False):
            self.accumulate(x, y, size / total)
        x, y = micro_batches[-1]
        uniform = len(sizes) > 1 and len(set(sizes)) == 1
        return float(self.finish(x, y, sizes[-1] / total, count_noise=uniform))

    def scalar(self, value: Any) -> tf.Tensor:
        """``value`` (a share or a flag) as a tensor, made once: a new one per call costs more than a small step."""
        if isinstance(value, tf.Tensor):
            return value
        key = (type(value), value)
        tensor = self._scalars.get(key)
        if tensor is None:
            if len(self._scalars) > 256:  # shares of windows cut anew (an adaptive trainer's): keep it small
                self._scalars.clear()
            tensor = self._scalars[key] = tf.constant(value, tf.bool if isinstance(value, bool) else tf.float32)
        return tensor

    def last_noise_norms(self) -> tuple[float, float]:
        """The last window's (mean squared norm of its micro-batch gradients, squared norm of its gradient)."""
        micro_sq, window_sq = self._noise_norms.numpy().tolist()
        return float(micro_sq), float(window_sq)

    def noise_totals(self) -> tuple[int, int, float, float]:
        """Over the windows :meth:`finish` counted: (windows, windows left out as not finite, the sum of their
        mean squared micro-batch gradient norms, the sum of their squared window gradient norms)."""
        windows, skipped, micro_sq_sum, window_sq_sum = self._noise_totals.numpy().tolist()
        return int(windows), int(skipped), float(micro_sq_sum), float(window_sq_sum)

    def norm_seconds(self, repeats: int = 5) -> float:
        """What one pass of the noise norms costs: the least of ``repeats`` traced calls that compute them over
        the gradient accumulators, as a measured window computes them once per micro-batch and once for
        the window. The call's own overhead is counted too, which the norms inside a window do not pay:
        an estimate on the high side, so a budget measures fewer windows, never more."""
        self._make_accumulators()
        if self._norm_pass is None:
            self._norm_pass = _traced(lambda: _squared_norm(self.accumulated_gradients), [])
            self._norm_pass()  # traces
        least = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            float(self._norm_pass())
            least = min(least, time.perf_counter() - started)
        return least

    def set_learning_rate(self, learning_rate: float) -> None:
        """Train the next windows at ``learning_rate`` (a learning-rate schedule's step).

        It is assigned to the optimizer's learning-rate variable (a LossScaleOptimizer's inner one),
        which the traced steps read when they run: nothing is traced again.
        """
        self.optimizer.learning_rate = learning_rate

    def reset_window(self) -> None:
        """Zero the gradient accumulators and the window loss: the window starts again."""
        for accumulator in self._accumulators or ():
            accumulator.assign(tf.zeros_like(accumulator))
        self._window_loss.assign(0.0)
        if self.measures_noise:
            self._micro_sq_sum.assign(0.0)
            self._micro_count.assign(0.0)

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

    def _make_accumulators(self) -> None:
        if self._accumulators is None:  # eagerly, outside the traced functions, which capture them
            self._accumulators = [
                tf.Variable(tf.zeros(v.shape, dtype=v.dtype), trainable=False, name="grad_accumulator")
                for v in self._variables
            ]

    # --- traced: each runs only while tracing, on the device after that ---------------------------------

    def _accumulate_micro_batch(self, x, y, share, measure):
        """Gradients of one micro-batch's mean loss × ``share``, added into the accumulators."""
        self._traced_once("accumulate")
        loss, gradients = self._gradients(x, y, share)
        self._add(loss, gradients, share, measure)
        return loss

    def _finish_window(self, x, y, share, measure, count_noise):
        """The last micro-batch added, one optimizer step, the accumulators zeroed; the window's loss."""
        self._traced_once("apply, finish")
        loss, gradients = self._gradients(x, y, share)
        self._add(loss, gradients, share, measure)
        return self._step_accumulated(measure, count_noise)

    def _apply_accumulated(self):
        """One optimizer step with the accumulated gradients, then zero them; returns the window's loss."""
        self._traced_once("apply")
        return self._step_accumulated(None, None)

    def _step_window(self, x, y):
        """A window of one micro-batch: its gradient is the window's, applied as it comes."""
        self._traced_once("apply, step")
        loss, gradients = self._gradients(x, y, tf.constant(1.0, tf.float32))
        # Dense and in the variables' dtype, as the accumulators would hold them: the same step either way.
        dense = [
            tf.zeros(v.shape, v.dtype) if g is None else tf.cast(tf.convert_to_tensor(g), v.dtype)
            for g, v in zip(gradients, self._variables, strict=True)
        ]
        self.optimizer.apply_gradients(zip(dense, self._variables, strict=True))
        return loss

    def _gradients(self, x, y, share):
        """One micro-batch's loss × ``share`` and its gradients, under its own tape (× a loss scale)."""
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            if self.loss_fn is None:  # regularisation is in compute_loss: the shares sum to 1, so once per window
                loss = compiled_loss(self.model, x, y, predictions, training=True) * share
            else:
                loss = tf.reduce_mean(self.loss_fn(y, predictions)) * share
                if self.model.losses:  # regularisers: the shares sum to 1, so once per window in all
                    loss += tf.add_n([tf.cast(extra, tf.float32) for extra in self.model.losses]) * share
            scaled = self.optimizer.scale_loss(loss)  # a LossScaleOptimizer scales; others pass it through
        return loss, tape.gradient(scaled, self._variables)

    def _traced_once(self, name: str) -> None:
        self._traces[name] = self._traces.get(name, 0) + 1  # runs only while tracing

    def _add(self, loss, gradients, share, measure) -> None:
        """Add one micro-batch's loss and gradients into the window's (and its norm into the noise sums)."""
        assert self._accumulators is not None
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
            tf.cond(measure, lambda: self._add_micro_norm(gradients, share), lambda: None)
        self._window_loss.assign_add(loss)

    def _add_micro_norm(self, gradients, share) -> None:
        # The gradient of this micro-batch's mean loss is the tape's divided by share × loss scale.
        squared = _squared_norm(gradients)
        self._micro_sq_sum.assign_add(squared / tf.square(share * self._loss_scale()))
        self._micro_count.assign_add(1.0)

    def _step_accumulated(self, measure, count_noise):
        """The optimizer's step with the accumulators, which are then zeroed; the window's loss.

        ``measure`` (a bool tensor, or None for always) records the window's noise norms; ``count_noise``
        (a bool tensor, or None for never) also adds them to the totals.
        """
        assert self._accumulators is not None
        gradients = [accumulator.read_value() for accumulator in self._accumulators]
        if self.measures_noise:  # before the step, which may change the loss scale
            if measure is None:
                self._record_window_norms(gradients, count_noise)
            else:
                tf.cond(measure, lambda: self._record_window_norms(gradients, count_noise), lambda: None)
        # A LossScaleOptimizer unscales here, once, and skips the step if any gradient is not finite.
        self.optimizer.apply_gradients(zip(gradients, self._variables, strict=True))
        window_loss = self._window_loss.read_value()
        self.reset_window()
        return window_loss

    def _record_window_norms(self, gradients, count_noise) -> None:
        window_sq = _squared_norm(gradients) / tf.square(self._loss_scale())
        micro_sq = self._micro_sq_sum.read_value() / tf.maximum(self._micro_count.read_value(), 1.0)
        norms = tf.stack([micro_sq, window_sq])
        self._noise_norms.assign(norms)
        if count_noise is None:
            return
        # As NoiseScaleEstimator.add_window does per window: a non-finite norm (an overflowing step) is left out.
        # (Both norms are ≥ 0, so their sum is finite exactly when both are.)
        counted = tf.concat([[1.0, 0.0], norms], axis=0)
        left_out = tf.constant([0.0, 1.0, 0.0, 0.0], tf.float32)
        chosen = tf.where(tf.math.is_finite(micro_sq + window_sq), counted, left_out)
        self._noise_totals.assign_add(tf.cast(tf.where(count_noise, chosen, tf.zeros_like(chosen)), tf.float64))

    def _loss_scale(self):
        """What the loss, and so every gradient, is multiplied by: a LossScaleOptimizer's scale, else 1."""
        return tf.cast(self.optimizer.scale_loss(tf.constant(1.0, tf.float32)), tf.float32)

    def _loss_sum(self, x, y):
        self._traced_once("evaluate")
        predictions = self.model(x, training=False)
        if self.loss_fn is None:  # a mean over the batch: times its samples, each weighs the same
            count = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
            return compiled_loss(self.model, x, y, predictions, training=False) * count
        return tf.reduce_sum(self.loss_fn(y, predictions))


def _traced(function: Callable, signature: list | None) -> Callable:
    """``function`` traced once: called as its concrete function where ``signature`` fixes the inputs
    (traced at the first call), else as a ``tf.function`` that generalises shapes (see the class)."""
    if signature is None:
        return tf.function(function, reduce_retracing=True)
    polymorphic = tf.function(function, input_signature=signature)
    concrete = None

    def call(*args):
        nonlocal concrete
        if concrete is None:
            concrete = polymorphic.get_concrete_function()
        return concrete(*args)

    return call


def batch_length(x: Any) -> int:
    """The samples in a batch ``x`` (an array or tensor, or a dict or tuple of them)."""
    return int(tf.nest.flatten(x)[0].shape[0])


def _squared_norm(gradients) -> tf.Tensor:
    """Σ |g|² over a list of gradients, in float32 (a sparse one is summed into its dense form first).

    One kernel per gradient (``l2_loss`` is Σ g²/2): with a small model's micro-batches, ops
    that each cost a microsecond or two are what the estimate costs.
    """
    halves = []
    for gradient in gradients:
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):  # repeated indices add up before squaring
            gradient = tf.convert_to_tensor(gradient)
        halves.append(tf.nn.l2_loss(tf.cast(gradient, tf.float32)))
    return 2.0 * tf.add_n(halves) if halves else tf.constant(0.0, tf.float32)
