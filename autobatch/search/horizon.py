"""The training horizon: how long the user's real run will train, parsed once at the boundary.

Why a horizon exists: a trial that trains a fraction of an epoch rewards the config that takes
the most optimizer steps in that fraction, a tiny micro-batch at a high learning rate, which is
rarely the best config for a run of several epochs. The recommendation must be for the run the
user will make, so every objective reads the horizon: trials are continued toward it and, where
they stop short, the loss at the horizon is predicted (``autobatch.search.curves``).

Units, case-insensitive, spaces and a thousands separator (``200_000``, ``200,000``) allowed:

- epochs: ``"3ep"``, ``"3 epochs"``, ``"1 epoch"``, ``"0.5ep"`` (passes over the training split);
- samples: ``"200000 samples"``, ``"200k samples"``, ``"1.5M samples"``, ``"2B samples"``;
- optimizer steps: ``"5000 steps"``, ``"5k steps"``, ``"5,000 optimizer steps"`` (one step per
  effective batch, so a step is micro-batch × accumulation samples);
- wall time: ``"90s"``, ``"90 sec"``, ``"15min"``, ``"2h"``, ``"2 hours"``, ``"1d"``, and sums such
  as ``"1h30min"`` or ``"1 d 12 h"`` (largest unit first, each once). At a wall-time horizon a
  faster config trains more samples, so throughput counts.

A bare number is refused (3 what?), and so is ``"m"``: minutes or million. Samples and steps
are whole numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autobatch.errors import InvalidParameterError

HORIZON_UNITS = ("epochs", "samples", "steps", "seconds")

_COUNT_WORDS = {
    "ep": "epochs",
    "epoch": "epochs",
    "epochs": "epochs",
    "sample": "samples",
    "samples": "samples",
    "step": "steps",
    "steps": "steps",
    "optimizer step": "steps",
    "optimizer steps": "steps",
}
# Largest first: a sum of durations must name them in this order, each once.
_SECONDS_PER = {
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
}
_MULTIPLIERS = {"k": 1e3, "m": 1e6, "b": 1e9}
_NUMBER = r"(?:[0-9]+(?:[_,][0-9]{3})*(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?"
_TERM = re.compile(rf"\s*({_NUMBER})\s*([a-z]+(?:\s+[a-z]+)*)?\s*")
_WHOLE = re.compile(rf"(?:\s*{_NUMBER}\s*(?:[a-z]+(?:\s+[a-z]+)*)?\s*)+")
_ALLOWED = (
    "expected how long the real run trains, with its unit: epochs ('3ep'), samples ('200k samples'), "
    "optimizer steps ('5000 steps') or wall time ('90s', '15min', '2h', '1h30min', '1d')"
)


@dataclass(frozen=True)
class Horizon:
    """How long the real run trains: ``amount`` of ``unit`` (one of :data:`HORIZON_UNITS`)."""

    amount: float
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in HORIZON_UNITS:
            raise InvalidParameterError("horizon", self.unit, f"the unit must be one of {', '.join(HORIZON_UNITS)}")
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
            raise InvalidParameterError("horizon", amount, "the amount must be a finite number > 0")
        if self.unit in ("samples", "steps") and not float(amount).is_integer():
            raise InvalidParameterError("horizon", amount, f"a number of {self.unit} must be whole")
        object.__setattr__(self, "amount", float(amount))

    @classmethod
    def parse(cls, value: object, parameter: str = "horizon") -> Horizon:
        """A horizon from a :class:`Horizon`, a :meth:`to_dict` dict or a string such as ``"3ep"``."""
        if isinstance(value, Horizon):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value, parameter)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise InvalidParameterError(parameter, value, f"a bare number has no unit; {_ALLOWED}")
        if not isinstance(value, str):
            raise InvalidParameterError(parameter, value, _ALLOWED)
        if value.strip().startswith("-"):
            raise InvalidParameterError(parameter, value, "must be a finite amount > 0")
        if not _WHOLE.fullmatch(value.lower()):
            raise InvalidParameterError(parameter, value, _ALLOWED)
        terms = [
            (float(number.replace("_", "").replace(",", "")), word or "")
            for number, word in _TERM.findall(value.lower())
        ]
        if len(terms) == 1:
            amount, unit = _count(*terms[0], value, parameter)
        else:
            amount, unit = _duration(terms, value, parameter), "seconds"
        if unit == "seconds":
            # 1.1 h is 3960.0000000000005 s in floating point; a microsecond is far below what a run can tell.
            amount = round(amount, 6)
        if not math.isfinite(amount) or amount <= 0:
            raise InvalidParameterError(parameter, value, "must be a finite amount > 0")
        if unit in ("samples", "steps"):
            if abs(amount - round(amount)) > 1e-9 * amount:
                raise InvalidParameterError(parameter, value, f"a number of {unit} must be whole")
            amount = float(round(amount))
        return cls(amount, unit)

    @property
    def is_time(self) -> bool:
        """Whether the horizon is wall time, where a faster config trains more samples."""
        return self.unit == "seconds"

    def samples(self, n_train: int, effective_batch_size: int, samples_per_second: float | None = None) -> float | None:
        """The samples the run trains: ``None`` for a wall-time horizon when the throughput is unknown."""
        if self.unit == "epochs":
            return self.amount * n_train
        if self.unit == "samples":
            return self.amount
        if self.unit == "steps":
            return self.amount * effective_batch_size
        return None if samples_per_second is None else self.amount * samples_per_second

    def __str__(self) -> str:
        if self.unit == "seconds":
            return _format_duration(self.amount)
        singular = {"epochs": "epoch", "samples": "sample", "steps": "optimizer step"}[self.unit]
        plural = {"epochs": "epochs", "samples": "samples", "steps": "optimizer steps"}[self.unit]
        return f"{_format_number(self.amount)} {singular if self.amount == 1 else plural}"

    def to_dict(self) -> dict:
        return {"amount": self.amount, "unit": self.unit}

    @classmethod
    def from_dict(cls, data: object, parameter: str = "horizon") -> Horizon:
        if not isinstance(data, Mapping) or set(data) != {"amount", "unit"}:
            raise InvalidParameterError(parameter, data, "expected a dict with exactly the keys 'amount' and 'unit'")
        try:
            return cls(data["amount"], data["unit"])
        except InvalidParameterError as error:
            raise InvalidParameterError(parameter, data, error.allowed) from None


#: the horizon when none is given: one pass over the task's training split, never a fraction of one
DEFAULT_HORIZON = Horizon(1.0, "epochs")


def _count(number: float, word: str, value: str, parameter: str) -> tuple[float, str]:
    """One term: a count of epochs, samples or steps (``"200k samples"``), or a single duration."""
    word = " ".join(word.split())
    if word == "":
        raise InvalidParameterError(parameter, value, f"a bare number has no unit; {_ALLOWED}")
    if word == "m":
        raise InvalidParameterError(parameter, value, "'m' is ambiguous: write 'min' for minutes or 'M samples'")
    if word in _COUNT_WORDS:
        return number, _COUNT_WORDS[word]
    if word in _SECONDS_PER:
        return number * _SECONDS_PER[word], "seconds"
    multiplier, rest = word[0], word[1:].strip()
    if multiplier in _MULTIPLIERS and _COUNT_WORDS.get(rest) in ("samples", "steps"):
        return number * _MULTIPLIERS[multiplier], _COUNT_WORDS[rest]
    raise InvalidParameterError(parameter, value, f"unknown unit {word!r}; {_ALLOWED}")


def _duration(terms: list[tuple[float, str]], value: str, parameter: str) -> float:
    """A sum of durations such as ``1h30min``, largest unit first, each once."""
    total, previous = 0.0, math.inf
    for number, word in terms:
        word = " ".join(word.split())
        if word == "m":
            raise InvalidParameterError(parameter, value, "'m' is ambiguous: write 'min' for minutes")
        if word not in _SECONDS_PER:
            raise InvalidParameterError(parameter, value, f"only durations add up ('1h30min'); {_ALLOWED}")
        if _SECONDS_PER[word] >= previous:
            raise InvalidParameterError(parameter, value, "name each unit of a duration once, the largest first")
        previous = _SECONDS_PER[word]
        total += number * previous
    return total


def _format_number(amount: float) -> str:
    return f"{int(amount):,}" if amount.is_integer() else f"{amount:,}"


def _format_duration(seconds: float) -> str:
    """``"90 s"``, ``"15 min"``, ``"1 h 30 min"``, ``"1 d 12 h"``: under two minutes, seconds alone."""
    if seconds < 120 and not (seconds / 60).is_integer():
        return f"{_format_number(seconds)} s"
    whole = int(seconds)
    parts = []
    for name, size in (("d", 86400), ("h", 3600), ("min", 60)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count} {name}")
    rest = whole + round(seconds - int(seconds), 6)
    if rest:
        parts.append(f"{_format_number(rest)} s")
    return " ".join(parts)
