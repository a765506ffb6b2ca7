"""How a trial spends its budget: which windows it trains, when it evaluates, when it stops.

A sample budget (``TrialBudget.train_samples``) trains that many samples and evaluates
once. A time budget (``TrialBudget.train_seconds``) trains until that much training time
has passed, evaluating at evenly spaced points. Either evaluates at the shares of the
budget in ``TrialBudget.evaluation_fractions`` instead, where a multi-fidelity search
asks for them. Every evaluation but the last is reported as an intermediate value, and
the trial stops early when the report comes back "prune" (a pruner's decision, made in
the study's process: see ``autobatch.process.trial_child``). Both backends run their loop through :func:`run_schedule`,
so they train, evaluate, time and report alike; only the training of one window and
the evaluation are theirs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from autobatch.core.progress import TrialProgress
from autobatch.core.windows import SampleStream, SteadyStateTimer, Window, extra_timing_windows, plan_windows

#: windows planned per data pipeline in a time-budgeted trial, first and at most: small
#: first chunks waste little when time runs out, later ones keep the per-pipeline cost rare
FIRST_CHUNK_WINDOWS = 8
MAX_CHUNK_WINDOWS = 256

#: windows of the longest samples a trial trains first, where memory depends on the sample: the first
#: builds the optimizer's state, the second runs with it, so the peak of the worst window is measured
WORST_CASE_WINDOWS = 2

#: feed(chunks) -> iterator of (window, that window's micro-batches in the backend's own form)
Feed = Callable[[Iterator[list[Window]]], Iterator[tuple[Window, Any]]]


@dataclass(frozen=True)
class Segment:
    """Training up to one evaluation."""

    step: int  # the step Optuna's pruners see: the evaluation's number, or the thousandths of the budget trained
    deadline_seconds: float | None  # training time at which it ends; None: when its windows run out
    final: bool
    until_samples: int | None = None  # samples trained at which it ends; None: by time or when windows run out


@dataclass
class ScheduleOutcome:
    """What :func:`run_schedule` did."""

    val_loss: float = math.nan
    last_train_loss: float = math.nan
    windows_trained: int = 0
    samples_trained: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    pruned: bool = False
    intermediate_losses: list[dict[str, float]] = field(default_factory=list)


class TrialSchedule:
    """The windows and evaluation points of one trial, drawn from one seeded sample stream."""

    def __init__(
        self, n_train: int, micro_batch_size: int, accumulation_steps: int, budget, longest_first=None
    ) -> None:
        """``longest_first``: the training indices from the largest sample to the smallest, where a
        sample's memory depends on its size; the trial then trains :data:`WORST_CASE_WINDOWS` windows of
        the longest samples first, so its peak is the worst window's (the first micro-batch of each
        holds the very longest)."""
        self.budget = budget
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self._stream = SampleStream(n_train, seed=budget.seed)
        self._next_index = 0
        effective = micro_batch_size * accumulation_steps
        self._worst_case = None if longest_first is None else longest_first[:effective]
        self._worst_case_left = 0 if longest_first is None else WORST_CASE_WINDOWS

    @property
    def time_budgeted(self) -> bool:
        return self.budget.train_seconds is not None

    def segments(self) -> list[Segment]:
        fractions = self.budget.evaluation_fractions
        if fractions:
            # Steps in thousandths of the budget: a pruner's rungs then sit at the same share of every trial.
            return [
                Segment(
                    step=round(1000 * share),
                    deadline_seconds=self.budget.train_seconds * share if self.time_budgeted else None,
                    final=share == 1.0,
                    until_samples=None if self.time_budgeted else math.ceil(self.budget.train_samples * share),
                )
                for share in fractions
            ]
        if not self.time_budgeted:
            return [Segment(step=1, deadline_seconds=None, final=True)]
        count = self.budget.evaluations
        return [
            Segment(step=k, deadline_seconds=self.budget.train_seconds * k / count, final=k == count)
            for k in range(1, count + 1)
        ]

    def training_chunks(self) -> Iterator[list[Window]]:
        """The training windows, in lists each backend builds one data pipeline for.

        A sample budget is one list (its last micro-batch may be short); a time budget is
        an endless run of lists of full windows, doubling in length.
        """
        if not self.time_budgeted:
            yield self._take(self.budget.train_samples)
            return
        windows = FIRST_CHUNK_WINDOWS
        while True:
            yield self._take(windows * self.micro_batch_size * self.accumulation_steps)
            windows = min(MAX_CHUNK_WINDOWS, windows * 2)

    def timing_windows(self, windows_trained: int) -> list[Window]:
        """Windows to run after the last evaluation, for timing alone, when training had too few to time."""
        extra = extra_timing_windows(windows_trained, self.budget.warmup_steps, self.budget.min_timed_steps)
        return self._take(extra * self.micro_batch_size * self.accumulation_steps)

    def _take(self, samples: int) -> list[Window]:
        windows: list[Window] = []
        size = self.micro_batch_size
        while self._worst_case is not None and self._worst_case_left and samples > 0:
            indices = self._worst_case[:samples]
            micro_batches = tuple(indices[i : i + size] for i in range(0, len(indices), size))
            windows.append(Window(self._next_index, micro_batches))
            self._next_index += 1
            self._worst_case_left -= 1
            samples -= len(indices)
        planned = list(plan_windows(self._stream, samples, size, self.accumulation_steps, self._next_index))
        self._next_index += len(planned)
        return windows + planned


def run_schedule(
    schedule: TrialSchedule,
    *,
    feed: Feed,
    train: Callable[[Window, Any, bool], float],
    evaluate: Callable[[], float],
    progress,
    timer: SteadyStateTimer,
) -> ScheduleOutcome:
    """Train, evaluate and report as ``schedule`` says.

    ``train(window, micro_batches, measure)`` runs one optimizer step (finished on the
    device when it returns) and returns its loss; ``measure`` is False for the windows
    run for timing alone, which no estimate should count. ``evaluate()`` returns the
    validation loss. Evaluation time is left out of the training clock and of throughput.
    """
    outcome = ScheduleOutcome()
    batches = feed(schedule.training_chunks())
    for segment in schedule.segments():
        progress.phase = "train"
        started = time.perf_counter()
        for window, micro_batches in batches:
            outcome.last_train_loss = train(window, micro_batches, True)
            timer.window_done(window.size)
            outcome.windows_trained += 1
            outcome.samples_trained += window.size
            deadline = segment.deadline_seconds
            if deadline is not None and outcome.train_seconds + time.perf_counter() - started >= deadline:
                break
            if segment.until_samples is not None and outcome.samples_trained >= segment.until_samples:
                break
        outcome.train_seconds += time.perf_counter() - started

        progress.phase = "eval"
        timer.pause()
        eval_started = time.perf_counter()
        outcome.val_loss = evaluate()
        outcome.eval_seconds += time.perf_counter() - eval_started
        if schedule.time_budgeted or schedule.budget.evaluation_fractions:
            outcome.intermediate_losses.append(
                {
                    "step": segment.step,
                    "train_seconds": outcome.train_seconds,
                    "samples": outcome.samples_trained,
                    "val_loss": outcome.val_loss,
                }
            )
        stop = segment.final or not math.isfinite(outcome.val_loss)  # a diverged trial has nothing left to show
        if not stop and report_intermediate(progress, segment.step, outcome.val_loss, outcome.train_seconds):
            outcome.pruned = stop = True
        timer.resume()  # after the report: waiting for the pruner's answer is not training time
        if stop:
            break

    extra = schedule.timing_windows(outcome.windows_trained)
    if extra:
        progress.phase = "train"
        for window, micro_batches in feed(iter([extra])):
            train(window, micro_batches, False)
            timer.window_done(window.size)
    return outcome


def report_intermediate(progress, step: int, val_loss: float, train_seconds: float) -> bool:
    """Report an intermediate validation loss to whoever runs the trial; True: stop (pruned).

    A worker's trial process gets a :class:`ReportingProgress` whose answer comes from the
    study's pruner; a backend run directly, with a plain ``TrialProgress``, goes on.
    """
    if not isinstance(progress, ReportingProgress):
        return False
    return progress.report(step, val_loss, train_seconds)


class ReportingProgress(TrialProgress):
    """A :class:`TrialProgress` that also passes intermediate losses on and returns the answer.

    ``reporter(step, val_loss, train_seconds)`` returns True when the trial should stop.
    """

    def __init__(self, reporter: Callable[[int, float, float], bool], **callbacks):
        super().__init__(**callbacks)
        self._reporter = reporter

    def report(self, step: int, val_loss: float, train_seconds: float) -> bool:
        return bool(self._reporter(step, val_loss, train_seconds))


def trial_extras(outcome: ScheduleOutcome, estimator) -> dict:
    """What a backend hands the worker beyond throughput and loss, as ``TrialMeasurements.extras``:
    the noise-scale estimate and, for a time budget, the intermediate losses and whether
    the trial was pruned (the worker moves them into the TrialResult's own fields)."""
    extras: dict = {"gradient_noise": estimator.summary()}
    if outcome.intermediate_losses:
        extras["intermediate_losses"] = outcome.intermediate_losses
        extras["pruned"] = outcome.pruned
    return extras
