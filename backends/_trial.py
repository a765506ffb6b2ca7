"""The framework-neutral trial template, after Keras's ``Trainer.fit`` calling a per-backend ``train_step``.

:meth:`TrialBackend.run_trial` runs every trial the same way: it has the backend build the
trial once (model, optimizer, loss, precision and data, in a :class:`Trial`), drives the
windows and evaluations through :func:`autobatch.core.schedule.run_schedule`, and assembles
the :class:`~autobatch.backends.base.TrialMeasurements` once. A backend supplies only what
differs between frameworks: how a trial is built, how one window trains, how the model is
evaluated, where the trial runs (:meth:`TrialBackend.trial_scope`) and its memory (the rest
of :class:`~autobatch.backends.base.Backend`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from autobatch.backends.base import Backend, TrialMeasurements
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.noise import NoiseScaleEstimator
from autobatch.core.progress import TrialProgress
from autobatch.core.schedule import TrialSchedule, run_schedule, trial_extras
from autobatch.core.windows import SteadyStateTimer, Window
from autobatch.tasks.loading import Task
from autobatch.tasks.samples import longest_first

__all__ = ["Trial", "TrialBackend", "mean_loss_in_batches"]


class TrialBackend(Backend):
    """A :class:`Backend` whose :meth:`run_trial` is this template; a subclass says how to :meth:`start_trial`."""

    @abc.abstractmethod
    def start_trial(self, task: Task, config: TrialConfig, budget: TrialBudget, device: str) -> Trial:
        """Build the trial's model, optimizer, loss, precision and data, once, ready to train.

        ``task`` is any task this backend runs (a :class:`~autobatch.tasks.workload.Workload`, or the
        framework's own task); one it cannot run is refused with an :class:`~autobatch.errors.InvalidParameterError`.
        """

    def trial_scope(self, device: str) -> contextlib.AbstractContextManager[Any]:
        """What the trial runs inside, from building the model to the last evaluation (a device scope)."""
        return contextlib.nullcontext()

    def run_trial(
        self, task: Task, config: TrialConfig, budget: TrialBudget, device: str, progress: TrialProgress
    ) -> TrialMeasurements:
        with self.trial_scope(device):
            trial = self.start_trial(task, config, budget, device)
            schedule = TrialSchedule(
                trial.n_train,
                config.micro_batch_size,
                config.accumulation_steps,
                budget,
                longest_first=trial.longest_first(),
            )
            trial.wait_for_device()
            progress.mark_baseline()  # model and data are in memory: what the worker records before training
            eval_batch = budget.eval_batch_size or config.micro_batch_size

            def validate() -> float:
                return trial.evaluate(eval_batch, budget.val_samples)

            timer = SteadyStateTimer(budget.warmup_steps)
            outcome = run_schedule(
                schedule, feed=trial.feed, train=trial.train_window, evaluate=validate, progress=progress, timer=timer
            )
            trial.finish()
        return TrialMeasurements(
            samples_per_second=timer.samples_per_second,
            val_loss=outcome.val_loss,
            samples_trained=outcome.samples_trained,
            steps_timed=timer.timed_windows,
            timings={"train": outcome.train_seconds, "eval": outcome.eval_seconds},
            extras={
                "final_train_loss": outcome.last_train_loss,
                **trial.extras(),
                **trial_extras(outcome, trial.noise),
            },
        )


class Trial(abc.ABC):
    """One trial's model, optimizer, loss, precision and data, built once by a backend.

    The noise-scale estimate needs two batch sizes, a micro-batch's and its window's, so it
    is measured only with accumulation (:attr:`measures_noise`); a backend adds its measured
    windows to :attr:`noise` as it trains or in :meth:`finish`.

    A backend sets, while building the trial: :attr:`n_train` (the training samples), :attr:`sample_sizes`
    (each training sample's size where memory depends on it, else ``None``: see
    :func:`autobatch.tasks.samples.sample_sizes`) and :attr:`optimizer_name` (the class of the
    optimizer built, from which the search reads the learning-rate rule's family).
    """

    def __init__(self, config: TrialConfig, budget: TrialBudget):
        self.config = config
        self.budget = budget
        self.measures_noise = budget.measure_noise and config.accumulation_steps > 1
        self.noise = NoiseScaleEstimator()
        self.n_train = 0
        self.sample_sizes: np.ndarray | None = None
        self.optimizer_name = ""

    def longest_first(self) -> np.ndarray | None:
        """The training indices from the largest sample to the smallest; ``None`` when all are alike."""
        return None if self.sample_sizes is None else longest_first(self.sample_sizes)

    @abc.abstractmethod
    def feed(self, chunks: Iterator[list[Window]]) -> Iterator[tuple[Window, Any]]:
        """Each window with its micro-batches in the framework's own form, one data pipeline per chunk."""

    @abc.abstractmethod
    def train_window(self, window: Window, micro_batches: Any, measure: bool) -> float:
        """One optimizer step, finished on the device when it returns; the window's loss.

        ``measure`` is False for windows run for timing alone, which no estimate should count.
        """

    @abc.abstractmethod
    def evaluate(self, batch_size: int, limit: int | None) -> float:
        """The mean validation loss over the first ``limit`` validation samples (all when ``None``).

        Where memory depends on the sample, those samples are evaluated longest first, so the
        evaluation's peak is its worst batch's too.
        """

    def wait_for_device(self) -> None:
        """Let the device finish what building the trial queued, before the memory baseline is taken."""
        return None  # the CPU has nothing queued

    def finish(self) -> None:
        """After the last window: collect what was measured on the device."""
        return None  # nothing is left on the device unless a backend measures there

    def extras(self) -> dict[str, Any]:
        """What this trial adds to ``TrialMeasurements.extras``; a backend adds its own to these."""
        extras: dict[str, Any] = {"optimizer": self.optimizer_name}
        if self.sample_sizes is not None:  # the size the peak was measured at: the longest sample's
            extras["worst_case_sample_size"] = int(self.sample_sizes.max())
        return extras


def mean_loss_in_batches(
    n_samples: int, batch_size: int, limit: int | None, loss_sum: Callable[[int, int], float]
) -> float:
    """The mean per-sample loss over the first ``limit`` of ``n_samples`` (all when ``None``), each weighing the same.

    ``loss_sum(start, stop)`` is the summed loss of samples ``start`` to ``stop``; the last batch may be short.
    """
    count = n_samples if limit is None else min(limit, n_samples)
    total = 0.0
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        total += loss_sum(start, stop)
    return total / count
