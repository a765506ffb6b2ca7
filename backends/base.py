"""The common trial interface every framework backend implements."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.progress import TrialProgress
from autobatch.errors import AutobatchError, InvalidParameterError
from autobatch.tasks.loading import Task

if TYPE_CHECKING:
    import numpy as np

    from autobatch.core.adaptive import MicroBatchController

__all__ = ["Backend", "DeviceConfigurationError", "TrainingSession", "TrialMeasurements", "TrialProgress"]


class DeviceConfigurationError(AutobatchError):
    """A device setting (a memory cap, memory growth) could not be applied: the device would run uncapped."""


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

    An instance lives inside a trial worker (or the training process). The worker calls, in
    order: :meth:`configure_device` right after the import, before the task loads; then, in
    the process that runs the trial, :meth:`apply_memory_cap` and :meth:`run_trial`; on an
    exception it asks :meth:`is_oom`. On a GPU the peak is :meth:`peak_memory_bytes` plus
    :meth:`device_overhead_bytes`; on the CPU the worker measures the process.
    """

    #: the framework's short name, as used in ``Workload.models`` and a task's ``framework``
    name: str = ""

    #: what :meth:`training_session` makes; ``None``: this backend cannot train outside a trial
    session_class: type[TrainingSession] | None = None

    def default_device(self) -> str:
        """The device trials run on when none is named."""
        return "cpu"

    def fork_safe(self, device: str) -> bool:
        """Whether trials on ``device`` may run in processes forked now: after this backend was
        imported and the task loaded. False once loading touched a device runtime that a
        fork breaks (CUDA): each trial then gets a new process."""
        return False

    def loads_task_in_trial(self, device: str) -> bool:
        """Whether each forked trial loads the task itself, rather than the worker once before forking.

        For a framework whose runtime a fork does not survive once an op has run (a task's factory
        often runs some: TensorFlow's tf.data pipelines): the worker imports the framework, runs
        nothing, and forks; each trial loads the task after the fork. Costs a task load per trial,
        saves a process (and a framework import) per trial.
        """
        return False

    def task_loading(self) -> contextlib.AbstractContextManager[Any]:
        """What the task is loaded inside, in a worker that will fork trials after it (see :meth:`fork_safe`)."""
        return contextlib.nullcontext()

    def configure_device(self, device: str, budget_bytes: int | None) -> None:
        """Settings that must precede the framework's first use of ``device``; the first call in a child.

        Called right after the import, before the task loads (the task may run ops). It must
        not start a runtime that a later fork would break (CUDA in PyTorch). Raises
        :class:`DeviceConfigurationError` when a setting could not be applied.
        """
        return None

    @abc.abstractmethod
    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        """Make the framework fail with its OOM error beyond ``budget_bytes`` on ``device``.

        Called in the process that runs the trial, before it starts. On the CPU the worker
        has already set ``RLIMIT_DATA``; a backend only needs to act for accelerators, and
        raises (never passes silently) when the cap cannot be applied.
        """

    @abc.abstractmethod
    def run_trial(
        self, task: Task, config: TrialConfig, budget: TrialBudget, device: str, progress: TrialProgress
    ) -> TrialMeasurements:
        """Train ``task`` as ``budget`` says at ``config``, then measure validation loss."""

    @abc.abstractmethod
    def is_oom(self, error: BaseException) -> bool:
        """Whether ``error`` is this framework's out-of-memory error."""

    def peak_memory_bytes(self, device: str) -> int | None:
        """The device allocator's peak since the last reset; ``None`` on the CPU."""
        return None

    def current_memory_bytes(self, device: str) -> int | None:
        """The device allocator's bytes in use now; ``None`` on the CPU."""
        return None

    def device_overhead_bytes(self, device: str) -> int | None:
        """What this process holds on ``device`` now outside the allocator the cap governs.

        The CUDA context, the kernels loaded into it, the libraries' handles and workspaces:
        they count against the budget too. ``None`` on the CPU or where it cannot be measured.
        """
        return None

    def reset_peak_memory(self, device: str) -> None:
        """Start a new peak measurement (between trials in a reused worker)."""
        return None  # the CPU's peak is the worker's to measure

    def training_session(
        self,
        task: Task,
        config: TrialConfig,
        *,
        device: str,
        seed: int,
        mixed_precision: bool,
        controller: MicroBatchController,
    ) -> TrainingSession:
        """A model of ``task`` trained window by window with ``config``, for ``autobatch train``.

        A backend names its :class:`TrainingSession` in :attr:`session_class`; one that cannot
        train outside a trial leaves it ``None``.
        """
        if self.session_class is None:
            raise NotImplementedError(f"backend {self.name or type(self).__name__!r} cannot train outside a trial")
        return self.session_class(
            task, config, device=device, seed=seed, mixed_precision=mixed_precision, controller=controller
        )


class TrainingSession(abc.ABC):
    """What ``autobatch train`` needs from a framework: one model trained window by window.

    The loop over epochs, progress, checkpoint timing and OOM recovery live in
    :mod:`autobatch.training`, framework-free; a session only trains, evaluates and saves.
    """

    #: an OOM may leave the process unable to train on (oneDNN on the CPU): checkpoint so a new
    #: process can take over
    crash_prone_oom: bool = False

    #: the training samples :meth:`run_window`'s indices point into (set while building the session)
    n_train: int = 0

    @abc.abstractmethod
    def __init__(
        self,
        task: Task,
        config: TrialConfig,
        *,
        device: str,
        seed: int,
        mixed_precision: bool,
        controller: MicroBatchController,
    ) -> None:
        """Build ``task``'s model, optimizer, loss and data on ``device``, seeded with ``seed``, to train at
        ``config``'s learning rate with the micro-batch ``controller`` keeps (made by
        :meth:`Backend.training_session`)."""

    @abc.abstractmethod
    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        """Train one optimizer step on the training samples at ``indices``; the window's mean loss."""

    def scale_learning_rate(self, multiplier: float) -> None:
        """Train the next windows at the config's learning rate × ``multiplier`` (a task's ``lr_schedule``).

        Each parameter group's own starting rate is scaled, so groups keep their ratios. A session that
        cannot set its rate refuses a schedule here, before the first window.
        """
        raise InvalidParameterError(
            "lr_schedule",
            f"a schedule for {type(self).__name__}",
            "needs a session that scales its learning rate (TrainingSession.scale_learning_rate); "
            "give None or 'constant'",
        )

    @abc.abstractmethod
    def evaluate(self, batch_size: int) -> float:
        """The mean loss over the task's validation samples in batches of ``batch_size``, leaving the model
        ready to train."""

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
