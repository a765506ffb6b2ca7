"""Errors autobatch raises at its boundaries."""

from __future__ import annotations


class AutobatchError(Exception):
    """Base class of every error autobatch raises on purpose."""


class InvalidParameterError(AutobatchError, ValueError):
    """A parameter was given a value outside what is allowed.

    The message names the parameter, the value given and what is allowed, in the
    style of scikit-learn's parameter validation.
    """

    def __init__(self, parameter: str, value: object, allowed: str):
        self.parameter = parameter
        self.value = value
        self.allowed = allowed
        super().__init__(f"{parameter}={value!r} is invalid: {allowed}")


class TaskLoadError(AutobatchError):
    """A task name or import path could not be turned into a workload."""


class BackendNotFoundError(AutobatchError):
    """No backend is registered under the requested name."""


class StorageError(AutobatchError):
    """The study storage could not be opened or does not hold what was asked for."""


def first_line(error: BaseException, prefer: tuple[str, ...] = ()) -> str:
    """An error in one line: its type and its first line, or the first that names one of ``prefer``.

    Frameworks bury the cause: TensorFlow puts "Graph execution error:" and a traceback of the
    Python call site before the line that says what ran out, hence ``prefer``.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = next((line for line in lines if any(word in line for word in prefer)), lines[0] if lines else "")
    return f"{type(error).__name__}: {useful}"[:300]
