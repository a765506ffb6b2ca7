"""The common trial interface every framework backend implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.progress import TrialProgress
from autobatch.tasks.workload import Workload

if TYPE_CHECKING:
    import numpy as np

    from autobatch.core.adaptive import MicroBatchController

__all__ = ["Backend", "TrainingSession", "TrialMeasurements", "TrialProgress"]


@dataclass
class TrialMeasurements:
    """What a backend measured in a trial that ran to the end."""

    samples_per_second: float | None
    val_loss: float
    samples_trained: int
    steps_timed: int
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """One framework's way to run a trial.

    An instance lives inside a trial worker. The worker calls, in order:
    :meth:`apply_memory_cap` (before the framework touches the device), then
    :meth:`run_trial`; on an exception it asks :meth:`is_oom`. On a GPU the peak
    comes from :meth:`peak_memory_bytes`; on the CPU the worker measures the process.
    """

    #: the framework's short name, as used in ``Workload.models``
    name: str = ""

    #: what :meth:`training_session` makes; ``None``: this backend cannot train outside a trial
    session_class: type[TrainingSession] | None = None

    def default_device(self) -> str:
        """The device trials run on when none is named."""
        return "cpu"

    def fork_safe(self, device: str) -> bool:
        """Whether trials on ``device`` may run in processes forked after this backend was
        imported and the task loaded, before any device or thread pool was touched."""
        return False

    @abc.abstractmethod
    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        """Make the framework fail with its OOM error beyond ``budget_bytes`` on ``device``.

        On the CPU the worker has already set ``RLIMIT_DATA``; a backend only needs
        to act for accelerators.
        """

    @abc.abstractmethod
    def run_trial(
        self, workload: Workload, config: TrialConfig, budget: TrialBudget, device: str, progress: TrialProgress
    ) -> TrialMeasurements:
        """Train ``budget.train_samples`` samples at ``config``, then measure validation loss."""

    @abc.abstractmethod
    def is_oom(self, error: BaseException) -> bool:
        """Whether ``error`` is this framework's out-of-memory error."""

    def peak_memory_bytes(self, device: str) -> int | None:
        """The device allocator's peak since the last reset; ``None`` on the CPU."""
        return None

    def current_memory_bytes(self, device: str) -> int | None:
        """The device allocator's bytes in use now; ``None`` on the CPU."""
        return None

    def reset_peak_memory(self, device: str) -> None:
        """Start a new peak measurement (between trials in a reused worker)."""
        return None  # the CPU's peak is the worker's to measure

    def training_session(
        self,
        workload: Workload,
        config: TrialConfig,
        *,
        device: str,
        seed: int,
        mixed_precision: bool,
        controller: MicroBatchController,
    ) -> TrainingSession:
        """A model of ``workload`` trained window by window with ``config``, for ``autobatch train``.

        A backend names its :class:`TrainingSession` in :attr:`session_class`; one that cannot
        train outside a trial leaves it ``None``.
        """
        if self.session_class is None:
            raise NotImplementedError(f"backend {self.name or type(self).__name__!r} cannot train outside a trial")
        return self.session_class(
            workload, config, device=device, seed=seed, mixed_precision=mixed_precision, controller=controller
        )


class TrainingSession(abc.ABC):
    """What ``autobatch train`` needs from a framework: one model trained window by window.

    The loop over epochs, progress, checkpoint timing and OOM recovery live in
    :mod:`autobatch.training`, framework-free; a session only trains, evaluates and saves.
    """

    #: an OOM may leave the process unable to train on (oneDNN on the CPU): checkpoint so a new
    #: process can take over
    crash_prone_oom: bool = False

    @abc.abstractmethod
    def __init__(
        self,
        workload: Workload,
        config: TrialConfig,
        *,
        device: str,
        seed: int,
        mixed_precision: bool,
        controller: MicroBatchController,
    ) -> None:
        """Build ``workload``'s model, optimizer and loss on ``device``, seeded with ``seed``, to train at
        ``config``'s learning rate with the micro-batch ``controller`` keeps (made by
        :meth:`Backend.training_session`)."""

    @abc.abstractmethod
    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        """Train one optimizer step on the training samples at ``indices``; the window's mean loss."""

    @abc.abstractmethod
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
        """The mean loss over ``x, y`` in batches of ``batch_size``, leaving the model ready to train."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free what a failed step or evaluation held."""

    @abc.abstractmethod
    def save(self, path: str) -> None:
        """Write the trained model in the framework's own format for ``path``."""

    @abc.abstractmethod
    def save_checkpoint(self, path: str) -> None:
        """Write what a new process needs to continue exactly: weights and optimizer state."""

    @abc.abstractmethod
    def load_checkpoint(self, path: str) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`."""

    @abc.abstractmethod
    def is_oom(self, error: BaseException) -> bool:
        """Whether ``error`` is this framework's out-of-memory error."""

    def peak_memory_bytes(self) -> int | None:
        """The device allocator's peak; ``None`` on the CPU (the supervisor measures the process)."""
        return None

    def current_memory_bytes(self) -> int | None:
        """The device allocator's bytes in use now; ``None`` on the CPU."""
        return None
