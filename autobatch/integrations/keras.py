"""Fit a compiled Keras model with a recommendation, and keep its effective batch through an out-of-memory error.

::

    from autobatch.integrations.keras import fit

    history = fit(model, x, y, recommendation=result, epochs=5, validation_data=(x_val, y_val))

is ``model.fit`` with the three numbers set: ``batch_size`` is the micro-batch, the optimizer's
``gradient_accumulation_steps`` the accumulation (Keras 3 averages the micro-batches' gradients
and steps once per window; its ``iterations`` count optimizer steps) and its learning rate the
recommended one.

**The optimizer.** Keras reads ``gradient_accumulation_steps`` when the optimizer is built (the
accumulators are created then) and when ``fit`` traces its step. An optimizer not built yet (a
model compiled, not fitted) is set in place: ``model.optimizer`` stays the user's object. A
built one cannot grow accumulators, so it is rebuilt from its config (its class and every
setting kept: betas, clipping, weight decay, EMA, name) and its state carried over variable by
variable (moments, the step count in optimizer steps) into ``model.optimizer``, a new object
now; then Keras traces the step again. A
learning-rate schedule is refused: scaling it is a guess about what it means; start it at
``recommendation.learning_rate`` and pass ``keep_learning_rate=True``.

**Data.** Arrays (or dicts / lists of them) get ``batch_size``. A ``tf.data.Dataset`` is taken
as batched, as ``model.fit`` takes one, and re-cut to the micro-batch with ``rebatch`` (the
sample order kept); one whose elements have a scalar part holds single samples and is refused
(add ``.batch(n)``, any ``n``). Generators and ``PyDataset`` choose their own batches: refused.
Keras weights every micro-batch of a window alike and lets a window run on into the next
epoch, so the math is exactly one effective batch per step only when the epoch's sample count
is a multiple of the effective batch (a warning says so for arrays that are not).

**Out of memory** (``adaptive=True``). A callback cannot catch what ``fit`` raises, so this is
two parts: :class:`AdaptiveMicroBatch`, a callback that keeps a copy of the model's and the
optimizer's variables at the start of each epoch (in host memory: one more copy of the weights
and the optimizer's state), and this module's ``fit``, which catches the
OOM (:func:`autobatch.backends.tensorflow.is_oom_error`: ``ResourceExhaustedError``, and the
allocation failures the project recognises), puts that copy back, halves the micro-batch (to
the largest divisor of it at or below half: 12 → 6, 9 → 3), multiplies the accumulation alike (micro × accumulation stays the effective batch) and fits on
from that epoch with ``initial_epoch``. Kept exactly: the weights, BatchNorm statistics, seeds,
the optimizer's moments and step count, its learning rate, a window begun in the previous
epoch (its accumulated gradient rescaled to the new count), the effective batch. Redone: the
epoch the OOM struck, from its start (its steps are undone), at the new size; with
``shuffle=False`` its windows hold the same samples, so the run ends as one at the small
micro-batch from the start would (float rounding aside); with shuffling the redone epoch
draws a new order. Not kept: your callbacks see ``on_train_begin`` and that epoch's begin
again (``EarlyStopping``'s patience restarts). The micro-batch does not grow back. An OOM in
validation is not adapted (the training batch is not its cause): it raises, naming the
validation batch. On the CPU, TensorFlow's oneDNN kernels often abort the runtime or kill the
process instead of raising; an aborted runtime raises
:class:`~autobatch.core.adaptive.UnrecoverableOOMError` (``autobatch train`` redoes such
steps in a new process).
"""

from __future__ import annotations

import gc
import inspect
import math
import warnings
from typing import Any

import numpy as np

# The backend's import of TensorFlow: quiet, and set for a memory-capped process.
from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.backends.tensorflow.memory import is_oom_error, unrecoverable
from autobatch.core.adaptive import Adaptation, MicroBatchOOMError, describe_oom, first_line
from autobatch.errors import InvalidParameterError
from autobatch.integrations._recommendation import Recommendation, load_recommendation

__all__ = ["AdaptiveMicroBatch", "apply_to_optimizer", "fit"]


def fit(
    model: keras.Model,
    x: Any = None,
    y: Any = None,
    *,
    recommendation: Any,
    epochs: int = 1,
    adaptive: bool = True,
    min_micro_batch: int = 1,
    keep_learning_rate: bool = False,
    **fit_kwargs: Any,
) -> keras.callbacks.History:
    """``model.fit`` at the recommended micro-batch, accumulation and learning rate.

    ``recommendation``: a :class:`~autobatch.integrations.Recommendation`, a ``TuneResult`` or a
    dict (see :func:`~autobatch.integrations.load_recommendation`). ``fit_kwargs`` go to
    ``model.fit`` (not ``batch_size``: the recommendation sets it). ``validation_batch_size``
    defaults to the recommendation's ``eval_batch_size`` (the largest micro-batch the study
    evaluated within its budget), else the micro-batch. ``steps_per_epoch`` counts
    micro-batches of the recommended size; it is scaled when the micro-batch is.

    Returns a ``History`` with one entry per epoch (an epoch that was redone, once) and
    ``history.adaptations``: the :class:`~autobatch.core.adaptive.Adaptation` dicts.
    """
    rec = load_recommendation(recommendation)
    if "batch_size" in fit_kwargs:
        raise InvalidParameterError(
            "batch_size", fit_kwargs["batch_size"], f"not given: the recommendation sets it ({rec.describe()})"
        )
    if isinstance(min_micro_batch, bool) or not isinstance(min_micro_batch, int) or min_micro_batch < 1:
        raise InvalidParameterError("min_micro_batch", min_micro_batch, "an int >= 1")
    _refuse_unbatchable(x)
    apply_to_optimizer(model, rec, keep_learning_rate=keep_learning_rate)
    _warn_if_windows_straddle(x, rec, fit_kwargs)

    callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    steps_per_epoch = fit_kwargs.pop("steps_per_epoch", None)
    validation_data = fit_kwargs.pop("validation_data", None)
    eval_batch = fit_kwargs.pop("validation_batch_size", None) or rec.eval_batch_size or rec.micro_batch_size
    if isinstance(validation_data, tf.data.Dataset):
        validation_data = validation_data.rebatch(eval_batch)
    tracker = AdaptiveMicroBatch(rec.micro_batch_size, rec.accumulation_steps)
    start = fit_kwargs.pop("initial_epoch", 0)
    while True:
        scale = rec.micro_batch_size // tracker.micro_batch_size  # steps_per_epoch is in recommended micro-batches
        try:
            with warnings.catch_warnings():
                if isinstance(x, tf.data.Dataset) and steps_per_epoch is None:
                    # A re-cut dataset's length is unknown, so Keras warns at the end of every epoch that it ran out.
                    warnings.filterwarnings("ignore", message="Your input ran out of data")
                model.fit(
                    **_micro_batched(x, y, tracker.micro_batch_size),
                    epochs=epochs,
                    initial_epoch=start,
                    callbacks=[tracker, *callbacks],
                    steps_per_epoch=None if steps_per_epoch is None else steps_per_epoch * scale,
                    validation_data=validation_data,
                    validation_batch_size=eval_batch,
                    **fit_kwargs,
                )
            break
        except Exception as error:  # noqa: BLE001 - only an OOM is kept; everything else is raised again
            if not adaptive or not is_oom_error(error):
                raise
            if isinstance(error, tf.errors.AbortedError):
                raise unrecoverable(error) from error
            detail = first_line(error)
            if tracker.evaluating:
                raise MicroBatchOOMError(
                    f"out of memory in validation at validation_batch_size={eval_batch} ({detail}); "
                    "the training micro-batch is not its cause: pass a smaller validation_batch_size",
                    step=tracker.optimizer_steps(model),
                    micro_batch_size=eval_batch,
                    window_size=eval_batch,
                    detail=detail,
                ) from error
            smaller = tracker.smaller_micro_batch()
            if smaller < min_micro_batch:
                raise tracker.cannot_split(model, detail, min_micro_batch) from error
        else:
            break
        start = tracker.recover(model, smaller, detail)  # the error is let go of: its frames held the step's tensors
    return tracker.history(model)


def apply_to_optimizer(model: keras.Model, recommendation: Any, *, keep_learning_rate: bool = False) -> None:
    """Set the compiled model's optimizer to the recommended accumulation and learning rate.

    In place while the optimizer is not built; a built one is rebuilt from its config with its
    state carried over (a window it had half accumulated is dropped).
    """
    rec = load_recommendation(recommendation)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or getattr(model, "loss", None) is None:
        raise InvalidParameterError(
            "model", type(model).__name__, "a compiled model: call model.compile(optimizer=..., loss=...) first"
        )
    inner = _inner(optimizer)
    if not keep_learning_rate and not isinstance(inner._learning_rate, keras.Variable):
        raise InvalidParameterError(
            "model.optimizer.learning_rate",
            type(inner._learning_rate).__name__,
            f"a float, replaced by the recommended {rec.learning_rate:.3g}; for a schedule, start it at "
            "recommendation.learning_rate and pass keep_learning_rate=True",
        )
    learning_rate = None if keep_learning_rate else rec.learning_rate
    if not optimizer.built:
        inner.gradient_accumulation_steps = _keras_steps(rec.accumulation_steps)
        if learning_rate is not None:
            inner.learning_rate = learning_rate
        model.make_train_function(force=True)  # a traced step holds the old count
        return
    saved = {variable.path: variable.numpy() for variable in optimizer.variables}
    _rebuild_optimizer(
        model, saved, rec.accumulation_steps, built=True, learning_rate=learning_rate, carried_window_scale=None
    )


class AdaptiveMicroBatch(keras.callbacks.Callback):
    """The part of OOM adaptation a Keras callback can do: a restore point at each epoch's start.

    :func:`fit` adds it and catches the OOM that ``model.fit`` raises; a callback alone cannot.
    ``micro_batch_size`` and ``accumulation_steps`` are the current ones (their product stays
    the effective batch); ``adaptations`` lists each change.
    """

    def __init__(self, micro_batch_size: int, accumulation_steps: int):
        super().__init__()
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.adaptations: list[Adaptation] = []
        self.evaluating = False
        self._epoch = 0
        self._model_state: list[np.ndarray] = []
        self._optimizer_state: dict[str, np.ndarray] = {}
        self._optimizer_built = False
        self._steps_done = 0  # optimizer steps before the epoch
        self._epoch_logs: dict[int, dict] = {}
        self._params: dict = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._model_state = [variable.numpy() for variable in self.model.variables]
        optimizer = self.model.optimizer
        self._optimizer_state = {variable.path: variable.numpy() for variable in optimizer.variables}
        self._optimizer_built = optimizer.built
        self._steps_done = self.optimizer_steps(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_logs[epoch] = dict(logs or {})
        self._params = dict(self.params or {})

    def on_test_begin(self, logs=None):
        self.evaluating = True

    def on_test_end(self, logs=None):
        self.evaluating = False

    def optimizer_steps(self, model: keras.Model) -> int:
        return int(model.optimizer.iterations.numpy())

    def smaller_micro_batch(self) -> int:
        """The next size: the largest divisor of the current one at or below half of it (0 below 1).

        A divisor of the old size divides the effective batch too, and a window carried from the
        previous epoch converts to it exactly.
        """
        old = self.micro_batch_size
        return next((size for size in range(old // 2, 0, -1) if old % size == 0), 0)

    def cannot_split(self, model: keras.Model, detail: str, min_micro_batch: int) -> MicroBatchOOMError:
        step, effective = self.optimizer_steps(model) + 1, self.micro_batch_size * self.accumulation_steps
        return MicroBatchOOMError(
            describe_oom(
                step, self.micro_batch_size, effective, detail, adaptive=True, min_micro_batch=min_micro_batch
            ),
            step=step,
            micro_batch_size=self.micro_batch_size,
            window_size=effective,
            detail=detail,
        )

    def recover(self, model: keras.Model, new_micro: int, detail: str) -> int:
        """Back to the start of the epoch the OOM struck, at micro-batch ``new_micro``; returns that epoch."""
        old_micro, old_steps = self.micro_batch_size, self.accumulation_steps
        effective = old_micro * old_steps
        gc.collect()
        for variable, value in zip(model.variables, self._model_state, strict=bool(self._model_state)):
            variable.assign(value)  # (no copy yet: the OOM struck before the first epoch began)
        factor = old_micro // new_micro
        self.micro_batch_size, self.accumulation_steps = new_micro, old_steps * factor
        _rebuild_optimizer(
            model,
            self._optimizer_state,
            self.accumulation_steps,
            built=self._optimizer_built,
            learning_rate=None,
            carried_window_scale=factor,
        )
        self.adaptations.append(
            Adaptation(
                step=self._steps_done + 1,
                old_micro_batch=old_micro,
                new_micro_batch=new_micro,
                old_accumulation=old_steps,
                new_accumulation=self.accumulation_steps,
                effective_batch_size=effective,
                cause="oom",
                epoch=self._epoch + 1,
                detail=detail,
            )
        )
        for epoch in [epoch for epoch in self._epoch_logs if epoch >= self._epoch]:
            del self._epoch_logs[epoch]
        return self._epoch

    def history(self, model: keras.Model) -> keras.callbacks.History:
        """One ``History`` for the whole run: each epoch once, as it finally ran."""
        history = keras.callbacks.History()
        history.set_model(model)
        history.set_params(self._params)
        history.epoch = sorted(self._epoch_logs)
        for epoch in history.epoch:
            for key, value in self._epoch_logs[epoch].items():
                history.history.setdefault(key, []).append(value)
        history.adaptations = [adaptation.to_dict() for adaptation in self.adaptations]
        model.history = history
        return history


# -- the optimizer -------------------------------------------------------------------------------------


def _rebuild_optimizer(
    model: keras.Model,
    saved: dict[str, np.ndarray],
    accumulation_steps: int,
    *,
    built: bool,
    learning_rate: float | None,
    carried_window_scale: int | None,
) -> None:
    """A new optimizer from the model's one's config at ``accumulation_steps``, holding the state in ``saved``.

    ``saved`` is a copy of the optimizer's variables by path (the new one has the same paths:
    its name is kept), ``built`` whether it had been built then. The step count is carried in
    optimizer steps. A window begun and not yet stepped: with ``carried_window_scale`` (the old
    micro-batch over the new one) its gradient sum and micro-step count are scaled to the new
    micro-batches; without, it is dropped.
    """
    old = model.optimizer
    config = old.get_config()
    inner_config = config["inner_optimizer"]["config"] if "inner_optimizer" in config else config
    old_steps = inner_config.get("gradient_accumulation_steps") or 1
    inner_config["gradient_accumulation_steps"] = _keras_steps(accumulation_steps)
    if learning_rate is not None:
        inner_config["learning_rate"] = learning_rate
    new = type(old).from_config(config)
    if built:
        new.build(model.trainable_variables)
    micro_steps_path = _micro_steps_variable(old).path  # counts micro-batches where the optimizer accumulates
    for variable in new.variables:
        value = saved.get(variable.path)
        name = variable.path.rpartition("/")[2]
        if variable.path == micro_steps_path and value is not None:
            steps_done, pending = divmod(int(value), old_steps)
            carried = pending * carried_window_scale if carried_window_scale else 0
            variable.assign(steps_done * accumulation_steps + carried)
        elif name.endswith("gradient_accumulator"):
            carried_sum = np.zeros(variable.shape) if value is None else value * (carried_window_scale or 0)
            variable.assign(carried_sum)
        elif value is not None and not (name == "learning_rate" and learning_rate is not None):
            variable.assign(value)
    model.optimizer = new
    compile_config = getattr(model, "_compile_config", None)
    if compile_config is not None:  # what model.save() writes as the compiled optimizer
        compile_config.config["optimizer"] = new
    model.make_train_function(force=True)  # the traced step holds the old optimizer


def _micro_steps_variable(optimizer):
    return next(variable for variable in _inner(optimizer).variables if variable.name == "iteration")


def _inner(optimizer):
    """The optimizer that accumulates: a LossScaleOptimizer (mixed precision) wraps it."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _keras_steps(accumulation_steps: int) -> int | None:
    return accumulation_steps if accumulation_steps > 1 else None  # Keras takes None or >= 2


# -- data ------------------------------------------------------------------------------------------------


def _micro_batched(x: Any, y: Any, micro_batch_size: int) -> dict[str, Any]:
    """``model.fit``'s data at the micro-batch: a dataset re-cut, arrays with ``batch_size``."""
    if isinstance(x, tf.data.Dataset):
        return {"x": x.rebatch(micro_batch_size), "y": y}
    return {"x": x, "y": y, "batch_size": micro_batch_size}


def _refuse_unbatchable(x: Any) -> None:
    if isinstance(x, tf.data.Dataset):
        if any(spec.shape.rank == 0 for spec in tf.nest.flatten(x.element_spec)):
            raise InvalidParameterError(
                "x",
                str(x.element_spec),
                "a batched tf.data.Dataset, as model.fit takes one: these elements have a scalar part, so they "
                "are single samples; add .batch(n) (any n: fit re-cuts it to the micro-batch)",
            )
        return
    if isinstance(x, keras.utils.PyDataset) or inspect.isgenerator(x) or type(x).__name__ == "DataLoader":
        raise InvalidParameterError(
            "x",
            type(x).__name__,
            "arrays (or a dict or list of them) or a tf.data.Dataset: this one chooses its own batches",
        )


def _warn_if_windows_straddle(x: Any, rec: Recommendation, fit_kwargs: dict) -> None:
    if isinstance(x, tf.data.Dataset) or fit_kwargs.get("validation_split") or fit_kwargs.get("steps_per_epoch"):
        return
    leaves = tf.nest.flatten(x)
    samples = len(leaves[0]) if leaves and hasattr(leaves[0], "__len__") else None
    if samples and samples % rec.effective_batch_size:
        windows = math.ceil(samples / rec.micro_batch_size) / rec.accumulation_steps
        warnings.warn(
            f"{samples} samples are not a multiple of the effective batch {rec.effective_batch_size}: Keras weights "
            f"the last, short micro-batch like a full one and runs windows on into the next epoch "
            f"({windows:.2f} windows an epoch)",
            stacklevel=3,
        )
