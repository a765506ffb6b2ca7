"""How a running trial tells its worker where it is (the phase, and when the baseline is set)."""

from __future__ import annotations

from collections.abc import Callable


class TrialProgress:
    """How a running trial tells its worker where it is.

    The backend sets :attr:`phase` as it goes (``setup``, ``train``, ``eval``) so an
    OOM can be placed, and calls :meth:`mark_baseline` once the model and data are
    ready so the worker can record the memory in use before training.
    """

    def __init__(self, on_phase: Callable[[str], None] | None = None, on_baseline: Callable[[], None] | None = None):
        self._phase = "setup"
        self._on_phase = on_phase
        self._on_baseline = on_baseline

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = value
        if self._on_phase is not None:
            self._on_phase(value)

    def mark_baseline(self) -> None:
        if self._on_baseline is not None:
            self._on_baseline()
