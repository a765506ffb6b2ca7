"""Parameter constraints declared once, next to what they guard (scikit-learn's style).

A function declares what each parameter may be and is decorated::

    @validate_params({"n_trials": [Interval(int, 1, None), None], "sampler": [StrOptions(SAMPLERS)]})
    def tune(task, backend, n_trials=None, sampler="tpe"): ...

and a dataclass declares ``_parameter_constraints`` and calls :func:`validate_fields` in
``__post_init__``. A value passes if any one constraint of its list accepts it (``None`` in the
list accepts ``None``). A value that none accepts raises :class:`InvalidParameterError`, whose
message names the parameter, the value and what is allowed.

Written by hand rather than taken from scikit-learn, whose ``validate_params`` is private API,
or pydantic, whose messages name types and validators rather than saying what a user may give.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, TypeVar

from autobatch.errors import InvalidParameterError

__all__ = [
    "Constraint",
    "Interval",
    "IsCallable",
    "Options",
    "StrOptions",
    "check_param",
    "validate_fields",
    "validate_params",
]

Function = TypeVar("Function", bound=Callable[..., Any])


class Constraint:
    """What one parameter may be; ``str(constraint)`` says it to a user ("must be ...")."""

    def is_satisfied_by(self, value: object) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    """A number between ``left`` and ``right`` (``None``: unbounded on that side).

    ``kind`` is ``int`` (booleans are refused) or ``float`` (any finite real number).
    ``closed`` says which ends belong: ``"left"``, ``"right"``, ``"both"`` or ``"neither"``.
    ``unit`` names what the number counts ("seconds"); ``hint`` is an example for the message.
    """

    kind: type
    left: float | None
    right: float | None
    closed: str = "both"
    unit: str = ""
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (int, float):
            raise TypeError(f"Interval kind must be int or float, not {self.kind!r}")
        if self.closed not in ("left", "right", "both", "neither"):
            raise TypeError(f"Interval closed must be left, right, both or neither, not {self.closed!r}")

    def is_satisfied_by(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, Integral):
            return False
        if not isinstance(value, Real) or not math.isfinite(float(value)):
            return False
        number = float(value)
        if self.left is not None:
            if number < self.left or (number == self.left and self.closed in ("right", "neither")):
                return False
        if self.right is not None:
            if number > self.right or (number == self.right and self.closed in ("left", "neither")):
                return False
        return True

    def __str__(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.unit:
            noun += f" of {self.unit}"
        left_closed = self.closed in ("left", "both")
        right_closed = self.closed in ("right", "both")
        if self.left is not None and self.right is not None:
            text = f"must lie in {'[' if left_closed else '('}{_number(self.left)}, {_number(self.right)}{']' if right_closed else ')'}"
        elif self.left is not None:
            text = f"must be {noun} {'>=' if left_closed else '>'} {_number(self.left)}"
        elif self.right is not None:
            text = f"must be {noun} {'<=' if right_closed else '<'} {_number(self.right)}"
        else:
            text = f"must be {noun}"
        return f"{text} ({self.hint})" if self.hint else text


class Options(Constraint):
    """One of a fixed set of values, listed in the order given."""

    def __init__(self, options: Iterable[Any]):
        self.options = list(options)

    def is_satisfied_by(self, value: object) -> bool:
        return any(value == option and type(value) is type(option) for option in self.options)

    def __str__(self) -> str:
        return f"must be one of {self.options}"


class StrOptions(Options):
    """One of a fixed set of strings."""

    def is_satisfied_by(self, value: object) -> bool:
        return isinstance(value, str) and value in self.options


class IsCallable(Constraint):
    """A function or any other callable object (a class, a ``functools.partial``)."""

    def __init__(self, what: str = "a callable"):
        self.what = what

    def is_satisfied_by(self, value: object) -> bool:
        return callable(value)

    def __str__(self) -> str:
        return f"must be {self.what}"


def check_param(name: str, value: object, constraints: list[Constraint | None] | Constraint) -> None:
    """Raise :class:`InvalidParameterError` unless one of ``constraints`` accepts ``value``."""
    if not isinstance(constraints, list):
        constraints = [constraints]
    if any(value is None if c is None else c.is_satisfied_by(value) for c in constraints):
        return
    raise InvalidParameterError(name, value, _allowed_text(constraints))


def validate_fields(instance: Any, constraints: dict[str, list[Constraint | None] | Constraint] | None = None) -> None:
    """Check a dataclass's fields against ``constraints`` (default: its ``_parameter_constraints``)."""
    for name, allowed in (constraints or instance._parameter_constraints).items():
        check_param(name, getattr(instance, name), allowed)


def validate_params(constraints: dict[str, list[Constraint | None] | Constraint]) -> Callable[[Function], Function]:
    """Check the named parameters of every call against ``constraints`` before the body runs."""

    def decorate(function: Function) -> Function:
        signature = inspect.signature(function)
        unknown = set(constraints) - set(signature.parameters)
        if unknown:
            raise TypeError(f"{function.__qualname__} has no parameters {sorted(unknown)}")

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for name, allowed in constraints.items():
                check_param(name, bound.arguments[name], allowed)
            return function(*args, **kwargs)

        checked._parameter_constraints = constraints  # type: ignore[attr-defined]
        return checked  # type: ignore[return-value]

    return decorate


def _allowed_text(constraints: list[Constraint | None]) -> str:
    texts = [str(c) for c in constraints if c is not None]
    text = " or ".join(texts) if texts else "must be None"
    return f"{text}, or None" if None in constraints else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
