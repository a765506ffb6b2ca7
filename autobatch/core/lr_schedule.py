"""Learning-rate schedules over a run's length, applied alike by every trial and by ``autobatch train``.

A real run warms up and decays; trials at a constant rate would search the rate of a run nobody
makes. A :class:`LearningRateSchedule` maps ``progress``, the share of a run's length done (0 to 1),
to a multiplier of the config's learning rate. A trial applies it over its own length (its samples
or training seconds), ``autobatch train`` over its planned windows, so the rate searched is the peak
of the schedule the run uses. A window trains at the progress made before it, as PyTorch's and
Keras's schedulers count steps. A task's ``lr_schedule`` is spelled:

- ``None`` or ``"constant"``: the config's learning rate throughout;
- ``"cosine"``: cosine decay from 1 to 0 over the run (Loshchilov & Hutter, 2017);
- ``"warmup-cosine"``: linear warm-up over the first 5 % of the run, then cosine decay to 0;
- ``"constant:WARMUP"``, ``"cosine:WARMUP"``, ``"cosine:WARMUP:FINAL"``: a linear warm-up over the
  share ``WARMUP`` in [0, 1) of the run, and the multiplier ``FINAL`` in [0, 1] the cosine ends at;
- a callable ``progress -> multiplier`` (a function in the task's module), finite and >= 0;
- a :class:`LearningRateSchedule`.

Written by hand: two closed forms; the frameworks' schedulers count steps, a trial's length may be seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autobatch._validation import Interval
from autobatch.errors import InvalidParameterError

__all__ = ["LR_SCHEDULES", "WARMUP_COSINE_SHARE", "LearningRateSchedule"]

LR_SCHEDULES = ("constant", "cosine")

#: the warm-up share of ``"warmup-cosine"``
WARMUP_COSINE_SHARE = 0.05

_ALLOWED = (
    "must be None, 'constant', 'cosine', 'warmup-cosine', 'constant:WARMUP' or 'cosine:WARMUP[:FINAL]' "
    "(WARMUP in [0, 1), FINAL in [0, 1]), a callable progress -> multiplier, or a LearningRateSchedule"
)
_WARMUP, _FINAL = Interval(float, 0, 1, closed="left"), Interval(float, 0, 1)


@dataclass(frozen=True)
class LearningRateSchedule:
    """The learning-rate multiplier at each share of a run done: ``name`` one of :data:`LR_SCHEDULES`
    with a linear ``warmup`` share and the cosine's ``final`` multiplier, or the user's ``function``."""

    name: str = "constant"
    warmup: float = 0.0
    final: float = 0.0
    function: Callable[[float], float] | None = None

    def __post_init__(self) -> None:
        if self.function is not None:
            if not callable(self.function) or self.warmup or self.final:
                raise InvalidParameterError(
                    "lr_schedule", _Shown(self.function), "is a whole schedule: no warmup/final"
                )
            for progress in (0.0, 0.5, 1.0):  # once, here: a schedule that cannot run fails before any trial
                self.multiplier(progress)
        elif self.name not in LR_SCHEDULES:
            raise InvalidParameterError("lr_schedule", self.name, _ALLOWED)
        elif not _WARMUP.is_satisfied_by(self.warmup):
            raise InvalidParameterError("lr_schedule", self, f"WARMUP ({self.warmup!r} here) must lie in [0, 1)")
        elif not _FINAL.is_satisfied_by(self.final) or (self.name == "constant" and self.final):
            raise InvalidParameterError(
                "lr_schedule", self, f"FINAL ({self.final!r} here) must lie in [0, 1], cosine only"
            )

    @property
    def is_constant(self) -> bool:
        """Multiplier 1 throughout: nothing to apply."""
        return self.function is None and self.name == "constant" and self.warmup == 0

    def multiplier(self, progress: float) -> float:
        """The learning rate's multiplier once the share ``progress`` (clipped to [0, 1]) of the run is done."""
        progress = min(1.0, max(0.0, float(progress)))
        if self.function is not None:
            return _checked(self.function, progress)
        if progress < self.warmup:
            return progress / self.warmup
        if self.name == "constant":
            return 1.0
        decayed = (progress - self.warmup) / (1.0 - self.warmup)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * decayed))

    def __str__(self) -> str:
        """The spelling :meth:`parse` reads back (a callable: its import path)."""
        if self.function is not None:
            return self.name
        parts = [self.name] + ([f"{self.warmup:.12g}"] if self.warmup or self.final else [])
        return ":".join(parts + ([f"{self.final:.12g}"] if self.final else []))

    @classmethod
    def parse(cls, value: Any, parameter: str = "lr_schedule") -> LearningRateSchedule:
        """``value`` in any spelling of the module's docstring as a schedule; anything else, a one-line error."""
        if isinstance(value, cls) or value is None:
            return value or cls()
        try:
            if isinstance(value, str):
                return _parse_text(cls, value)
            if callable(value):
                return cls(name=_callable_name(value), function=value)
        except InvalidParameterError as error:  # said again with the parameter's name and the value as given
            raise InvalidParameterError(parameter, _Shown(value), error.allowed) from None
        raise InvalidParameterError(parameter, _Shown(value), _ALLOWED)


def _parse_text(cls: type[LearningRateSchedule], text: str) -> LearningRateSchedule:
    name, *numbers = text.strip().lower().split(":")
    if name == "warmup-cosine" and not numbers:
        return cls("cosine", warmup=WARMUP_COSINE_SHARE)
    if name not in LR_SCHEDULES or len(numbers) > (2 if name == "cosine" else 1):
        raise InvalidParameterError("lr_schedule", text, _ALLOWED)
    try:
        warmup, final = [float(number) for number in numbers] + [0.0] * (2 - len(numbers))
    except ValueError:
        raise InvalidParameterError("lr_schedule", text, _ALLOWED) from None
    return cls(name, warmup=warmup, final=final)


def _checked(function: Callable[[float], float], progress: float) -> float:
    """The user's multiplier at ``progress``, refused in one line unless a finite number >= 0."""
    try:
        value = float(function(progress))
    except Exception as error:  # the user's callable: whatever it raises becomes a line that names it
        detail = f"raised {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        raise InvalidParameterError("lr_schedule", _Shown(function), f"{detail} at progress {progress}") from None
    if not math.isfinite(value) or value < 0:
        detail = f"must return a finite multiplier >= 0; gave {value}"
        raise InvalidParameterError("lr_schedule", _Shown(function), f"{detail} at progress {progress}")
    return value


def _callable_name(function: Any) -> str:
    qualname = getattr(function, "__qualname__", None) or type(function).__name__
    return f"{function.__module__}:{qualname}" if getattr(function, "__module__", None) else str(qualname)


class _Shown(str):
    """A value as an error shows it: a callable by its import path, not its address."""

    def __new__(cls, value: Any) -> _Shown:
        return super().__new__(cls, _callable_name(value) if callable(value) else repr(value))

    def __repr__(self) -> str:
        return str(self)
