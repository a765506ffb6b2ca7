"""Adaptive micro-batching for a Keras model in your own loop, or in ``model.fit``'s place
(the controller is :mod:`autobatch.core.adaptive`)."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np

from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.backends.tensorflow.accumulate import MicroBatchTrainer, batch_length
from autobatch.backends.tensorflow.data import batch_spec
from autobatch.backends.tensorflow.memory import is_oom_error, unrecoverable
from autobatch.backends.tensorflow.training import PerSampleLoss
from autobatch.core.adaptive import AdaptiveStepper
from autobatch.core.windows import SampleStream, plan_windows

__all__ = ["AdaptiveMicroBatchTrainer", "fit_adaptive", "make_adaptive_train_step"]


class AdaptiveMicroBatchTrainer(AdaptiveStepper):
    """Adaptive micro-batching for a Keras model in your own loop: one call per window (optimizer step).

    ::

        step = AdaptiveMicroBatchTrainer(model, keras.optimizers.Adam(1e-3), "cross_entropy",
                                         micro_batch_size=256, x_spec=batch_spec(x), y_spec=batch_spec(y))
        for x_window, y_window in windows:  # each is one effective batch
            loss = step(x_window, y_window)
        print(step.adaptations)

    Built on :class:`MicroBatchTrainer` (one tape per micro-batch, gradients summed in
    variable accumulators, one optimizer step per window). When a micro-batch raises
    TensorFlow's OOM, the accumulators are zeroed, the model's non-trainable variables
    (BatchNorm statistics, counters) are put back as they were before the window, and the
    window is redone at half the micro-batch: same samples, same order, same effective
    batch and learning rate. Give ``x_spec``/``y_spec`` with a ``None`` batch dimension
    (:func:`batch_spec`) so a new size runs the same traced graph. An OOM in the optimizer
    step raises :class:`autobatch.core.adaptive.OptimizerStepOOMError`.

    On the CPU, TensorFlow 2.21's oneDNN kernels do not always raise a recoverable OOM:
    a convolution whose output cannot be allocated crashes the process (SIGSEGV or
    ``std::bad_alloc``), and one whose scratch memory cannot be allocated aborts the
    runtime (``AbortedError``; every later step fails), which this class raises as
    :class:`autobatch.core.adaptive.UnrecoverableOOMError`. Neither can be redone in that
    process; ``autobatch train`` redoes the window in a new process from its last
    checkpoint (see :mod:`autobatch.training`). It also does so for a plain
    ``ResourceExhaustedError`` on the CPU under a memory cap (``recover_in_process=False``):
    the allocator keeps what it grew to, so a redo in that process has little memory
    left for anything else, and fails in odd places (numpy, protobuf) if at all.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss: str | PerSampleLoss | None,
        *,
        micro_batch_size: int | None = None,
        max_micro_batch: int | None = None,
        min_micro_batch: int = 1,
        grow_after: int | None = None,
        adaptive: bool = True,
        x_spec: Any = None,
        y_spec: Any = None,
        on_adaptation=None,
        controller=None,
        trainer: MicroBatchTrainer | None = None,
        recover_in_process: bool = True,
    ):
        self._take_controller(
            controller,
            micro_batch_size,
            max_micro_batch=max_micro_batch,
            min_micro_batch=min_micro_batch,
            grow_after=grow_after,
            adaptive=adaptive,
            on_adaptation=on_adaptation,
        )
        self.model = model
        self.trainer = trainer or MicroBatchTrainer(model, optimizer, loss, x_spec=x_spec, y_spec=y_spec)
        self.recover_in_process = recover_in_process

    def __call__(self, x, y, *, epoch: int | None = None) -> float:
        return self.step(x, y, epoch=epoch)

    def step(self, x, y, *, epoch: int | None = None) -> float:
        """One optimizer step over the window ``(x, y)``; returns the window's mean loss.

        ``x`` and ``y`` may be dicts or tuples of arrays; each micro-batch is a slice of every one.
        """

        def rows(start: int, stop: int) -> tuple[Any, Any]:
            return tf.nest.map_structure(lambda part: part[start:stop], (x, y))

        return self.step_samples(batch_length(x), rows, epoch=epoch)

    def step_samples(self, window_size: int, take, *, epoch: int | None = None) -> float:
        """One optimizer step over a window of ``window_size`` samples, whose micro-batch ``[start, stop)``
        ``take(start, stop)`` gives as ``(x, y)`` (padded to its own longest, for instance)."""
        state = list(self.model.non_trainable_variables)
        saved = [tf.identity(variable.value) for variable in state]
        trainer = self.trainer

        def accumulate(start: int, stop: int, share: float) -> None:
            try:
                trainer.accumulate(*take(start, stop), tf.constant(share, tf.float32))
            except Exception as error:
                if not is_oom_error(error):
                    raise
                if self.recover_in_process and isinstance(error, tf.errors.ResourceExhaustedError):
                    raise  # the controller splits the window and redoes it here
                raise unrecoverable(error) from error

        def apply() -> float:
            return float(trainer.apply())

        def release() -> None:
            trainer.reset_window()
            for variable, value in zip(state, saved, strict=True):
                variable.assign(value)
            gc.collect()

        return self.controller.run_window(
            window_size, accumulate, apply, is_oom=is_oom_error, release=release, epoch=epoch
        )


def make_adaptive_train_step(model: keras.Model, optimizer, loss, **options) -> AdaptiveMicroBatchTrainer:
    """The step builder: a callable ``step(x_window, y_window) -> loss`` that adapts its micro-batch.

    ``options`` are those of :class:`AdaptiveMicroBatchTrainer` (``micro_batch_size`` at least).
    """
    return AdaptiveMicroBatchTrainer(model, optimizer, loss, **options)


def fit_adaptive(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    micro_batch_size: int,
    epochs: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    **options,
) -> dict:
    """``model.fit`` for a compiled Keras model, with adaptive micro-batching inside each batch.

    ``batch_size`` is the effective batch (one optimizer step); it stays fixed while the
    micro-batch adapts. Uses the model's compiled optimizer and loss (``model.compute_loss``,
    so its regularisation losses count, as in ``fit``). Returns a history
    ``{"loss": [...], "val_loss": [...], "adaptations": [...]}``, one loss per epoch.
    """
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise ValueError("fit_adaptive needs a compiled model: call model.compile(optimizer=..., loss=...) first")
    step = AdaptiveMicroBatchTrainer(
        model,
        model.optimizer,
        None,  # the compiled loss
        micro_batch_size=micro_batch_size,
        x_spec=batch_spec(np.asarray(x)),
        y_spec=batch_spec(np.asarray(y)),
        **options,
    )
    stream = SampleStream(len(y), seed=seed, shuffle=shuffle)
    history: dict = {"loss": [], "val_loss": []}
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for window in plan_windows(stream, len(y), batch_size, 1):
            indices = window.micro_batches[0]
            total += step(x[indices], y[indices], epoch=epoch) * len(indices)
            count += len(indices)
        history["loss"].append(total / count)
        if validation_data is not None:
            x_val, y_val = validation_data
            history["val_loss"].append(step.trainer.evaluate(x_val, y_val, step.micro_batch_size))
    history["adaptations"] = [adaptation.to_dict() for adaptation in step.adaptations]
    return history
