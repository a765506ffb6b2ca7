"""Adaptive micro-batching: survive an out-of-memory error without changing the math.

A window is one optimizer step over a fixed set of samples (the effective batch).
:class:`MicroBatchController` splits each window into micro-batches of its current
size. When a micro-batch runs out of memory, the caller frees what the failed step
held, the controller halves the micro-batch (so the window takes twice the
accumulation steps) and the window is redone from its start: the same samples in
the same order, each micro-batch weighted by its share of the window, one optimizer
step. The effective batch, the learning rate and the sample order are exactly what
they were; only the float rounding of the gradient sum may differ. After
``grow_after`` clean windows the controller doubles the micro-batch again, never past
``max_micro_batch`` (the study's memory wall, or the starting size); a size that fails
again after growing makes the next growth wait twice as long.

This module is framework-free: the backends (``autobatch.backends.torch.backend``'s
``AdaptiveMicroBatcher``, ``autobatch.backends.tensorflow.backend``'s
``AdaptiveMicroBatchTrainer``) give it the framework's accumulate, apply, release
and OOM test. An OOM in the optimizer step itself is not redone: the optimizer may
have updated some weights already, so the step cannot be repeated exactly, and
:class:`OptimizerStepOOMError` says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from autobatch import errors
from autobatch.errors import AutobatchError, InvalidParameterError

#: clean windows at one size before the controller tries twice that size
DEFAULT_GROW_AFTER = 16
CAUSES = ("oom", "grow", "crash")


class MicroBatchOOMError(AutobatchError):
    """A micro-batch ran out of memory and was not (or could no longer be) split.

    ``step`` is the 1-based optimizer step, ``micro_batch_size`` the size that failed.
    The framework's own error is the ``__cause__``.
    """

    def __init__(self, message: str, *, step: int, micro_batch_size: int, window_size: int, detail: str = ""):
        super().__init__(message)
        self.step = step
        self.micro_batch_size = micro_batch_size
        self.window_size = window_size
        self.detail = detail


class OptimizerStepOOMError(AutobatchError):
    """The optimizer step ran out of memory after every micro-batch of its window had run.

    Unlike an OOM in a micro-batch this cannot be redone: the optimizer may have
    updated part of the weights and its state before it failed.
    """

    def __init__(self, message: str, *, step: int, detail: str = ""):
        super().__init__(message)
        self.step = step
        self.detail = detail


class UnrecoverableOOMError(AutobatchError):
    """The framework ran out of memory in a way that leaves this process unable to train on.

    TensorFlow 2.21 on the CPU: a oneDNN kernel that cannot allocate its scratch memory
    aborts the runtime (``AbortedError``), and every later step in the process fails.
    The window cannot be redone here; ``autobatch train`` redoes it in a new process,
    from its last checkpoint. ``detail`` is the framework's message in one line.
    """

    def __init__(self, message: str, *, detail: str = ""):
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Adaptation:
    """One change of micro-batch size, and why.

    ``step`` is the 1-based optimizer step from which the new size applies (for an
    OOM, the step that was redone). The accumulation figures are for that step's
    window: its sample count (``effective_batch_size``) is the same before and after.
    ``cause`` is ``oom`` (a micro-batch ran out of memory and the window was redone),
    ``crash`` (the framework died of an OOM it could not raise, and training resumed
    in a new process from the last checkpoint) or ``grow`` (a run of clean windows).
    """

    step: int
    old_micro_batch: int
    new_micro_batch: int
    old_accumulation: int
    new_accumulation: int
    effective_batch_size: int
    cause: str
    epoch: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.cause not in CAUSES:
            raise InvalidParameterError("cause", self.cause, f"must be one of {CAUSES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Adaptation:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


class MicroBatchController:
    """The current micro-batch size, how it splits a window, and how it changes.

    ``adaptive=False`` keeps the size fixed: an OOM raises :class:`MicroBatchOOMError`
    (which names the OOM and what to do about it) instead of splitting.
    ``on_adaptation`` is called with each :class:`Adaptation` as it happens.
    """

    def __init__(
        self,
        micro_batch_size: int,
        *,
        max_micro_batch: int | None = None,
        min_micro_batch: int = 1,
        grow_after: int | None = DEFAULT_GROW_AFTER,
        adaptive: bool = True,
        on_adaptation: Callable[[Adaptation], None] | None = None,
    ):
        _require_positive_int("micro_batch_size", micro_batch_size)
        _require_positive_int("min_micro_batch", min_micro_batch)
        if max_micro_batch is None:
            max_micro_batch = micro_batch_size
        _require_positive_int("max_micro_batch", max_micro_batch)
        if max_micro_batch < micro_batch_size:
            raise InvalidParameterError(
                "max_micro_batch", max_micro_batch, f"must be >= micro_batch_size={micro_batch_size}"
            )
        if min_micro_batch > micro_batch_size:
            raise InvalidParameterError(
                "min_micro_batch", min_micro_batch, f"must be <= micro_batch_size={micro_batch_size}"
            )
        if grow_after is not None:
            _require_positive_int("grow_after", grow_after)
        self.micro_batch_size = micro_batch_size
        self.max_micro_batch = max_micro_batch
        self.min_micro_batch = min_micro_batch
        self.grow_after = grow_after
        self.adaptive = adaptive
        self.on_adaptation = on_adaptation
        #: called as ``on_attempt(step, micro_batch_size, window_size)`` before each try of a window,
        #: and ``on_apply(step)`` before its optimizer step: where a process that dies was
        self.on_attempt: Callable[[int, int, int], None] | None = None
        self.on_apply: Callable[[int], None] | None = None
        self.adaptations: list[Adaptation] = []
        self.steps_done = 0  # optimizer steps taken
        self.samples_seen = 0  # samples in the windows whose optimizer step was taken
        self._patience = grow_after  # clean windows needed before the next growth
        self._clean_windows = 0
        self._grown_from: int | None = None  # the size before the last growth, while the size is a grown one

    # -- splitting ---------------------------------------------------------------------------

    def accumulation_steps(self, window_size: int) -> int:
        """Micro-batches a window of ``window_size`` samples takes at the current size."""
        return math.ceil(window_size / self.micro_batch_size)

    def split(self, window_size: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of each micro-batch of a window, in order."""
        micro = self.micro_batch_size
        return [(start, min(start + micro, window_size)) for start in range(0, window_size, micro)]

    # -- running a window ----------------------------------------------------------------------

    def run_window(
        self,
        window_size: int,
        accumulate: Callable[[int, int, float], Any],
        apply: Callable[[], Any],
        *,
        is_oom: Callable[[BaseException], bool],
        release: Callable[[], None],
        epoch: int | None = None,
    ) -> Any:
        """One optimizer step over a window of ``window_size`` samples; returns what ``apply`` returns.

        ``accumulate(start, stop, share)`` runs the micro-batch ``[start, stop)`` of the
        window and adds its gradient times ``share`` (its part of the window's samples);
        ``apply()`` takes the optimizer step and zeroes the gradients. On an OOM in
        ``accumulate``, ``release()`` must drop the partial gradients and any state the
        failed attempt changed, and free what it held; the window is then redone at half
        the size. The failed attempt's error and traceback are let go of before
        ``release`` runs, so the tensors its frames held can be freed.
        """
        _require_positive_int("window_size", window_size)
        step = self.steps_done + 1
        while True:
            if self.on_attempt is not None:
                self.on_attempt(step, self.micro_batch_size, window_size)
            detail = self._accumulate_window(window_size, accumulate, is_oom)
            if detail is None:
                break
            release()  # outside the except block: the failed frames are gone by now
            self.record_oom(step, window_size, detail, epoch=epoch)
        if self.on_apply is not None:
            self.on_apply(step)
        try:
            result = apply()
        except BaseException as error:
            if not is_oom(error):
                raise
            detail = first_line(error)
            raise OptimizerStepOOMError(
                f"out of memory in the optimizer step of step {step}, after all "
                f"{self.accumulation_steps(window_size)} micro-batches of its window had run ({detail}); "
                "the step cannot be redone safely because the optimizer may have updated part of the weights "
                "and its state. A smaller micro-batch does not help here: the optimizer needs the memory; "
                "raise the memory budget or use an optimizer with less state",
                step=step,
                detail=detail,
            ) from error
        self.window_done(window_size, epoch=epoch)
        return result

    def _accumulate_window(self, window_size: int, accumulate, is_oom) -> str | None:
        """Run every micro-batch of the window; the first line of the OOM if one ran out of memory."""
        try:
            for start, stop in self.split(window_size):
                accumulate(start, stop, (stop - start) / window_size)
        except BaseException as error:
            if not is_oom(error):
                raise
            if not self.adaptive:
                raise self._oom_error(self.steps_done + 1, window_size, first_line(error), adaptive=False) from error
            if self.micro_batch_size <= self.min_micro_batch:
                raise self._oom_error(self.steps_done + 1, window_size, first_line(error), adaptive=True) from error
            return first_line(error)
        return None

    # -- changing size ---------------------------------------------------------------------------

    def record_oom(
        self, step: int, window_size: int, detail: str, *, epoch: int | None = None, cause: str = "oom"
    ) -> Adaptation:
        """Halve the micro-batch after an OOM in step ``step``; the window is to be redone.

        Raises :class:`MicroBatchOOMError` when the size is already at ``min_micro_batch``.
        """
        old = self.micro_batch_size
        if old <= self.min_micro_batch:
            raise self._oom_error(step, window_size, detail, adaptive=True)
        new = max(self.min_micro_batch, old // 2)
        if self._grown_from is not None:
            # A size reached by growing did not hold: wait twice as long before growing again.
            self._patience = None if self._patience is None else self._patience * 2
        self._grown_from = None
        self._clean_windows = 0
        self.micro_batch_size = new
        return self._record(step, old, new, window_size, cause, epoch, detail)

    def window_done(self, window_size: int, *, epoch: int | None = None) -> Adaptation | None:
        """Count a clean window; after enough of them, double the size (up to the maximum)."""
        self.steps_done += 1
        self.samples_seen += window_size
        self._clean_windows += 1
        if not self.adaptive or self._patience is None or self.micro_batch_size >= self.max_micro_batch:
            return None
        if self._clean_windows < self._patience:
            return None
        old = self.micro_batch_size
        new = min(self.max_micro_batch, old * 2)
        self._grown_from = old
        self._clean_windows = 0
        self.micro_batch_size = new
        detail = f"{self._patience} clean windows at micro-batch {old}"
        return self._record(self.steps_done + 1, old, new, window_size, "grow", epoch, detail)

    def _record(self, step, old, new, window_size, cause, epoch, detail) -> Adaptation:
        adaptation = Adaptation(
            step=step,
            old_micro_batch=old,
            new_micro_batch=new,
            old_accumulation=math.ceil(window_size / old),
            new_accumulation=math.ceil(window_size / new),
            effective_batch_size=window_size,
            cause=cause,
            epoch=epoch,
            detail=detail[:300],
        )
        self.adaptations.append(adaptation)
        if self.on_adaptation is not None:
            self.on_adaptation(adaptation)
        return adaptation

    def _oom_error(self, step: int, window_size: int, detail: str, *, adaptive: bool) -> MicroBatchOOMError:
        return MicroBatchOOMError(
            describe_oom(
                step,
                self.micro_batch_size,
                window_size,
                detail,
                adaptive=adaptive,
                min_micro_batch=self.min_micro_batch,
            ),
            step=step,
            micro_batch_size=self.micro_batch_size,
            window_size=window_size,
            detail=detail,
        )

    # -- state, to resume in another process ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.micro_batch_size,
            "steps_done": self.steps_done,
            "samples_seen": self.samples_seen,
            "patience": self._patience,
            "clean_windows": self._clean_windows,
            "grown_from": self._grown_from,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_batch_size = int(state["micro_batch_size"])
        self.steps_done = int(state["steps_done"])
        self.samples_seen = int(state["samples_seen"])
        self._patience = state["patience"]
        self._clean_windows = int(state["clean_windows"])
        self._grown_from = state["grown_from"]


def describe_oom(
    step: int, micro_batch_size: int, window_size: int, detail: str, *, adaptive: bool, min_micro_batch: int = 1
) -> str:
    """One line that names the OOM and says what to do about it."""
    if adaptive:
        advice = (
            f"the micro-batch cannot be split further (min_micro_batch={min_micro_batch}); "
            "raise the memory budget or use a smaller model"
        )
    else:
        smaller = max(1, micro_batch_size // 2)
        advice = (
            "rerun with --adaptive (adaptive=True) to split such windows into smaller micro-batches, "
            f"or use a smaller micro-batch with more accumulation, e.g. --micro-batch {smaller} "
            f"--accumulation {math.ceil(window_size / smaller)}, which keeps the effective batch of {window_size}"
        )
    return f"out of memory at step {step} in a micro-batch of {micro_batch_size} samples ({detail}); {advice}"


def first_line(error: BaseException) -> str:
    """An out-of-memory error in one line: the line that says what ran out, where there is one."""
    return errors.first_line(error, prefer=("OOM", "alloc", "memory"))


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(name, value, "must be an integer >= 1")


class AdaptiveStepper:
    """What the frameworks' adaptive steppers share: a controller, made from their options or given."""

    controller: MicroBatchController

    def _take_controller(
        self,
        controller: MicroBatchController | None,
        micro_batch_size: int | None,
        *,
        max_micro_batch: int | None,
        min_micro_batch: int,
        grow_after: int | None,
        adaptive: bool,
        on_adaptation,
    ) -> None:
        if controller is None:
            if micro_batch_size is None:
                raise ValueError(f"{type(self).__name__} needs micro_batch_size (or a MicroBatchController)")
            controller = MicroBatchController(
                micro_batch_size,
                max_micro_batch=max_micro_batch,
                min_micro_batch=min_micro_batch,
                grow_after=DEFAULT_GROW_AFTER if grow_after is None else grow_after,
                adaptive=adaptive,
                on_adaptation=on_adaptation,
            )
        self.controller = controller

    @property
    def micro_batch_size(self) -> int:
        return self.controller.micro_batch_size

    @property
    def adaptations(self) -> list:
        return self.controller.adaptations

    @property
    def samples_seen(self) -> int:
        """Samples in the windows whose optimizer step was taken (a redone window counts once)."""
        return self.controller.samples_seen


__all__ = [
    "AdaptiveStepper",
    "Adaptation",
    "MicroBatchController",
    "MicroBatchOOMError",
    "OptimizerStepOOMError",
    "UnrecoverableOOMError",
    "DEFAULT_GROW_AFTER",
    "describe_oom",
    "first_line",
]
