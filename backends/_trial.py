"""The framework-neutral trial template, after Keras's ``Trainer.fit`` calling a per-backend ``train_step``.

:meth:`TrialBackend.run_trial` runs every trial the same way: it has the backend build the
trial once (model, optimizer, loss, precision and data, in a :class:`Trial`), drives the
windows and evaluations through :func:`autobatch.core.schedule.run_schedule`, and assembles
the :class:`~autobatch.backends.base.TrialMeasurements` once. A backend supplies only what
differs between frameworks: how a trial is built, how one window trains, how the model is
evaluated, how its learning rate is scaled, where the trial runs (:meth:`TrialBackend.trial_scope`)
and its memory (the rest of :class:`~autobatch.backends.base.Backend`). A task's learning-rate
schedule (:mod:`autobatch.core.lr_schedule`) is applied here, before each window, over the trial's
own length (:class:`ScheduledLearningRate`).
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from autobatch.backends.base import Backend, TrialMeasurements
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.lr_schedule import LearningRateSchedule
from autobatch.core.noise import NoiseScaleEstimator
from autobatch.core.progress import TrialProgress
from autobatch.core.schedule import TrialSchedule, run_schedule, trial_extras
from autobatch.core.windows import SteadyStateTimer, Window
from autobatch.errors import InvalidParameterError
from autobatch.tasks.loading import Task
from autobatch.tasks.samples import longest_first

__all__ = ["ScheduledLearningRate", "Trial", "TrialBackend", "mean_loss_in_batches"]


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
            lr_schedule = LearningRateSchedule.parse(getattr(task, "lr_schedule", None))
            # A constant rate is the optimizer's own: its trials run exactly as without a schedule.
            scheduled = None if lr_schedule.is_constant else ScheduledLearningRate(trial, lr_schedule, budget)
            outcome = run_schedule(
                schedule,
                feed=trial.feed,
                train=trial.train_window if scheduled is None else scheduled.train_window,
                evaluate=validate if scheduled is None else scheduled.evaluating(validate),
                progress=progress,
                timer=timer,
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
                **(scheduled.extras() if scheduled is not None else {}),
            },
        )


class ScheduledLearningRate:
    """A trial's windows with the learning rate ``schedule`` sets before each, over the trial's own length.

    Progress is the share of the budget done before the window: samples trained over
    ``budget.train_samples``, or training seconds (evaluation left out) over ``budget.train_seconds``.
    Windows run for timing alone, after the last evaluation, train at the schedule's end.
    """

    def __init__(self, trial: Trial, schedule: LearningRateSchedule, budget: TrialBudget):
        self.trial = trial
        self.schedule = schedule
        self.budget = budget
        self.multiplier: float | None = None  # the last one set: None, set at the first window
        self.samples_trained = 0
        self.eval_seconds = 0.0
        self.started = time.perf_counter()  # training starts now: the trial is built

    def train_window(self, window: Window, micro_batches: Any, measure: bool) -> float:
        multiplier = self.schedule.multiplier(self.progress() if measure else 1.0)
        if multiplier != self.multiplier:
            self.trial.scale_learning_rate(multiplier)
            self.multiplier = multiplier
        loss = self.trial.train_window(window, micro_batches, measure)
        self.samples_trained += window.size
        return loss

    def evaluating(self, evaluate: Callable[[], float]) -> Callable[[], float]:
        """``evaluate``, its time kept off the training clock a time budget's progress reads."""

        def timed() -> float:
            started = time.perf_counter()
            try:
                return evaluate()
            finally:
                self.eval_seconds += time.perf_counter() - started

        return timed

    def progress(self) -> float:
        """The share of the trial's length done, at most 1."""
        seconds = self.budget.train_seconds
        if seconds is None:
            return min(1.0, self.samples_trained / self.budget.train_samples)
        return min(1.0, (time.perf_counter() - self.started - self.eval_seconds) / seconds)

    def extras(self) -> dict[str, Any]:
        return {"lr_schedule": str(self.schedule), "final_lr_multiplier": self.multiplier}


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

    def scale_learning_rate(self, multiplier: float) -> None:
        """Train the next windows at the config's learning rate × ``multiplier`` (a task's ``lr_schedule``).

        Each parameter group's own starting rate is scaled, so groups keep their ratios. A backend
        that cannot set its rate refuses a schedule here, before the first window.
        """
        raise InvalidParameterError(
            "lr_schedule",
            f"a schedule for {type(self).__name__}",
            "needs a trial that scales its learning rate (Trial.scale_learning_rate); give None or 'constant'",
        )

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
