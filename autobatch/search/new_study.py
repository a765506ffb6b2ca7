"""A new study, made once: the probes that measure the task, then the Optuna study they found.

The memory-wall probe finds the largest micro-batch that fits the budget; the noise probe
(when the objective or the learning-rate rule needs it) measures the gradient noise scale.
Then the study is created with its settings, its sampler and two starting points, and its
probe attr is set last: that attr says the study is ready for other workers to join
(:func:`autobatch.search.coordination.create_once` runs all this in one process only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.errors import AutobatchError, InvalidParameterError, StorageError, first_line
from autobatch.search.fidelity import MIN_RUN_STEPS, largest_effective_batch, plan_fidelity
from autobatch.search.horizon import Horizon
from autobatch.search.objectives import Objective, get_objective
from autobatch.search.probe import (
    ACCUMULATED_PROBE_STEPS,
    ProbeResult,
    find_memory_wall,
    probe_budget,
    probe_timeout,
)
from autobatch.search.space import SearchSpace, scaled_learning_rate
from autobatch.tasks.optimizers import optimizer_family

if TYPE_CHECKING:
    from autobatch.process.worker import TrialWorker
    from autobatch.tasks.loading import Task

#: the noise probe's accumulation: four micro-batches give |G_small|² a fair average per window
NOISE_PROBE_ACCUMULATION = 4


@dataclass
class StudyPlan:
    """What :func:`autobatch.tune` resolved before the study exists: all it takes to probe and create it.

    ``settings`` are the study's settings as they will be stored; ``make_worker(budget_bytes)``
    makes a trial worker of the task under that budget.
    """

    settings: dict
    workload: Task
    search_space: SearchSpace
    trial_budget: TrialBudget
    make_worker: Callable[[int], TrialWorker]
    trial_timeout: float | None = None
    on_probe: Callable[[int, TrialResult], None] | None = None
    #: what the study's time is planned on: trials this call runs, and the seconds it may take
    n_trials: int | None = None
    study_seconds: float | None = None

    def probe_and_create(self, storage, study_name: str, sampler: str, seed: int | None) -> None:
        """Probe the memory wall (and the noise scale, if needed), then create the study ready to join."""
        settings = self.settings
        # Probes run under the budget less the margin, so whatever fits there leaves the
        # margin free under the real budget: the cap is what counts, not a reading.
        probe_limit = int(settings["memory_budget_bytes"] * (1 - settings["safety_margin"]))
        noise = None
        with self.make_worker(
            probe_limit
        ) as probe_worker:  # the noise probe reuses the worker the memory probe started
            probe = self._probe_memory_wall(probe_worker)
            self._learn_from_probe(probe)
            self._plan_trial_lengths(probe)
            if self.needs_noise_probe():
                noise = self._probe_noise_scale(probe_worker, probe.max_micro_batch)
        study = create_study(storage, study_name, sampler, seed, get_objective(settings["objective"]))
        study.set_user_attr("autobatch", settings)
        if noise is not None:
            study.set_user_attr("autobatch_noise", noise)
        self._enqueue_starting_points(study, probe.max_micro_batch, noise)
        study.set_user_attr("autobatch_probe", probe.to_dict())  # last: the study is ready to join

    def __post_init__(self) -> None:
        self._probe_extras: list[dict] = []  # what the probe trials that ran to the end said of the task

    def _learn_from_probe(self, probe: ProbeResult) -> None:
        """What only a built model tells: the optimizer's family (and so the learning-rate rule),
        the smallest micro-batch the model can train on, the longest sample the wall was measured at."""
        settings, extras = self.settings, self._probe_extras
        names = [e["optimizer"] for e in extras if e.get("optimizer")]
        if settings.get("optimizer") is None:
            if not names:
                raise AutobatchError("no memory probe reported the task's optimizer: the learning-rate rule is unknown")
            settings["optimizer"] = optimizer_family(names[0])
        if names:
            settings["optimizer_class"] = names[0]
        if settings.get("lr_rule") is None:
            settings["lr_rule"] = self.search_space.rule_for(settings["optimizer"], settings["objective"])
        smallest = max([1, *(int(e.get("min_micro_batch", 1)) for e in extras)])
        if smallest > self.search_space.min_micro_batch:
            # BatchNorm in training mode cannot normalise one sample: such micro-batches leave the space.
            self.search_space = dataclasses.replace(self.search_space, min_micro_batch=smallest)
            settings["search_space"] = self.search_space.to_dict()
            settings["task_min_micro_batch"] = smallest
        sizes = [int(e["worst_case_sample_size"]) for e in extras if e.get("worst_case_sample_size") is not None]
        if sizes:
            probe.worst_case_sample_size = max(sizes)

    def _plan_trial_lengths(self, probe: ProbeResult) -> None:
        """How far the search's trials train toward the horizon, from what the probes cost (search/fidelity.py)."""
        settings = self.settings
        if settings["objective"] == "time-to-target":  # its trials train a fixed time of their own
            settings["fidelity"] = None
            return
        plan = plan_fidelity(
            Horizon.from_dict(settings["horizon"]),
            n_train=settings["n_train"],
            base_batch_size=settings["base_batch_size"],
            probes=probe.probes,
            n_trials=self.n_trials,
            study_seconds=None if self.study_seconds is None else self.study_seconds - probe.seconds,
            max_trial_samples=settings.get("max_trial_samples"),
            multi_fidelity=get_objective(settings["objective"]).prunes,
        )
        settings["fidelity"] = plan.to_dict()

    def needs_noise_probe(self) -> bool:
        """Goodput and the adascale rule need B_noise before the first trial: a noise probe measures it."""
        return self.settings["objective"] == "goodput" or self.settings["lr_rule"] == "adascale"

    def _probe_memory_wall(self, worker: TrialWorker) -> ProbeResult:
        workload, space = self.workload, self.search_space
        losses: list[float] = []
        done: list[TrialResult] = []

        # A probe stops once it has reached its peak (search/probe.py: probe_budget); the wall
        # it finds is then confirmed with one full trial, as the search runs them, at the
        # largest accumulation searched. A time budget is run as samples in both: the peak
        # depends on the config, not on how long it trains.
        def run_probe(micro_batch: int, accumulation: int = 1, *, full: bool = False) -> TrialResult:
            config = TrialConfig(micro_batch, accumulation, workload.base_learning_rate)
            budget = probe_budget(self.trial_budget, config, full=full)
            timeout = self.trial_timeout or probe_timeout(done, budget, workload.n_val)
            result = worker.run(config, budget, timeout=timeout)
            done.append(result)
            if result.status == "ok" and result.val_loss is not None:
                losses.append(result.val_loss)
            if result.status == "ok":
                self._probe_extras.append(result.extras)
            return result

        # A micro-batch larger than the training split would repeat samples within one
        # forward pass: the split's size is the natural ceiling unless the user sets one. An
        # effective batch that leaves the run fewer than MIN_RUN_STEPS steps is not searched
        # (search/fidelity.py), so the wall is not looked for past it either.
        horizon = Horizon.from_dict(self.settings["horizon"])
        largest = space.max_effective_batch or largest_effective_batch(horizon, workload.n_train)
        self.settings["max_effective_batch"] = largest
        ceiling = space.max_micro_batch or workload.n_train
        if largest is not None and largest < ceiling:
            ceiling = largest
            why = (
                "max_effective_batch"
                if space.max_effective_batch
                else f"so that the run of {horizon} takes at least {MIN_RUN_STEPS} optimizer steps"
            )
            announce(f"search: effective batches up to {largest}, {why}; the memory wall is not looked for past it")
        accumulates = space.max_accumulation >= 2 and (largest is None or largest >= 2 * space.min_micro_batch)

        def confirm_steps(micro_batch: int) -> int:
            """The largest accumulation searched at ``micro_batch``; at least two where the search accumulates at all."""
            steps = space.max_accumulation if largest is None else min(space.max_accumulation, largest // micro_batch)
            return max(steps, 2 if accumulates else 1)

        probe = find_memory_wall(
            run_probe,
            self.settings["memory_budget_bytes"],
            safety_margin=self.settings["safety_margin"],
            upper_limit=ceiling,
            on_probe=self.on_probe,
            # The wall must hold for every searched config: confirmed with a full trial at the
            # largest accumulation searched there (holding gradients across a window costs the
            # same at two steps as at any more, so two covers the smaller micro-batches that
            # accumulate further) ...
            confirm=lambda micro_batch: run_probe(micro_batch, confirm_steps(micro_batch), full=True),
            # ... which starts where short probes at two steps put it, when the search goes past two
            # (at two, the confirmation itself costs about what they would)
            accumulated=(
                functools.partial(run_probe, accumulation=ACCUMULATED_PROBE_STEPS)
                if space.max_accumulation > ACCUMULATED_PROBE_STEPS
                else None
            ),
            confirm_steps=confirm_steps,
        )
        if space.min_micro_batch > probe.max_micro_batch:
            raise InvalidParameterError(
                "min_micro_batch",
                space.min_micro_batch,
                f"must be <= {probe.max_micro_batch}, the largest micro-batch that fits the memory budget",
            )
        if losses and not any(math.isfinite(loss) for loss in losses):
            # The task's own base learning rate is meant to train: a loss that is NaN there
            # is a broken task (or NaN in its data), and no trial could be ranked.
            raise AutobatchError(
                f"task={self.settings['task']!r}: the validation loss is {losses[0]} in every probe, at the task's own "
                f"base learning rate {workload.base_learning_rate:g}; check the task's model, loss and data for NaN"
            )
        return probe

    def _probe_noise_scale(self, worker: TrialWorker, wall: int) -> dict:
        """One trial at the task's base batch × NOISE_PROBE_ACCUMULATION, at its base learning rate, for B_noise.

        Measured once, when the study is created, and kept: goodput ranks every trial and the
        adascale rule maps every trial's params to a learning rate with this one number, so
        re-estimating it as trials come in would change the meaning of earlier trials.
        """
        workload = self.workload
        micro = max(1, min(wall, workload.base_batch_size))
        config = TrialConfig(micro, NOISE_PROBE_ACCUMULATION, workload.base_learning_rate)
        budget = dataclasses.replace(self.trial_budget, train_seconds=None, measure_noise=True)
        started = time.perf_counter()
        result = worker.run(config, budget, timeout=self.trial_timeout)
        if result.status != "ok":
            raise AutobatchError(
                f"the noise probe (micro-batch {micro} x accumulation {NOISE_PROBE_ACCUMULATION} at the base learning "
                f"rate) ended with status {result.status!r}: {(result.error or '').splitlines()[0] if result.error else ''}"
            )
        noise = {
            **result.gradient_noise,
            "accumulation_steps": NOISE_PROBE_ACCUMULATION,
            "learning_rate": workload.base_learning_rate,
            "seconds": time.perf_counter() - started,
        }
        estimate = noise.get("b_simple")
        announce(
            f"noise probe: micro-batch {micro} x {NOISE_PROBE_ACCUMULATION}: gradient noise scale B_simple "
            + (
                f"~ {estimate:.0f} samples"
                if estimate is not None
                else "too large to measure at this batch (unbounded)"
            )
        )
        return noise

    def _enqueue_starting_points(self, study, wall: int, noise: dict | None) -> None:
        """The wall at the rule's LR, and the task's base batch at its base LR."""
        workload, space, settings = self.workload, self.search_space, self.settings
        low, high = space.micro_batch_bounds(wall)
        high = min(high, wall)  # the wall probe has checked that low <= wall
        base = min(max(workload.base_batch_size, low), high)
        rule = settings["lr_rule"]
        noise_scale = None if noise is None else (math.inf if noise.get("b_simple") is None else noise["b_simple"])
        pin = get_objective(settings["objective"]).pins_learning_rate

        def at_rule(micro: int) -> float:
            return scaled_learning_rate(
                workload.base_learning_rate,
                workload.base_batch_size,
                micro,
                rule,
                0.0,
                noise_scale=noise_scale,
                optimizer=settings["optimizer"],
            )

        for config in (TrialConfig(high, 1, at_rule(high)), TrialConfig(base, 1, at_rule(base))):
            if space.powers_of_two and config.micro_batch_size & (config.micro_batch_size - 1):
                config = TrialConfig(2 ** int(math.log2(config.micro_batch_size)), 1, config.learning_rate)
            params = space.params_for(
                config,
                workload.base_batch_size,
                workload.base_learning_rate,
                settings["optimizer"],
                pin_learning_rate=pin,
                rule=rule,
                noise_scale=noise_scale,
            )
            study.enqueue_trial(params, skip_if_exists=True)


def create_study(storage, study_name: str, sampler: str, seed: int | None, objective: Objective):
    """The Optuna study ``study_name`` in ``storage``, with the objective's directions and metric names."""
    import optuna

    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            directions=list(objective.directions),
            sampler=make_sampler(sampler, seed),
            load_if_exists=True,  # another worker may have created it a moment ago
        )
    except Exception as error:
        raise StorageError(f"storage='the storage': cannot create study {study_name!r}: {first_line(error)}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objective.metric_names))
    return study


def load_with_sampler(storage, study_name: str, sampler: str, seed: int | None):
    """The stored study, with this process's own sampler (samplers are not stored)."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(sampler, seed))
    except KeyError:
        raise StorageError(f"study_name={study_name!r} was deleted while this worker joined it") from None


def make_sampler(name: str, seed: int | None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def announce(line: str | None) -> None:
    """Print ``line`` on stderr, above a progress bar if one is showing (which budget, and why)."""
    if not line:
        return
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)
