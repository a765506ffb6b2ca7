"""tune(): the micro-batch, accumulation and learning rate that train a task fastest within a memory budget.

The steps, in order: validate the parameters (before the storage is touched, so bad
input leaves it as it was), resolve the memory budget, open the storage, probe and
create the study once (:mod:`autobatch.search.new_study` under
:func:`~autobatch.search.coordination.create_once`) or join it, then search, here
(:mod:`autobatch.search.runner`) or in local worker processes
(:mod:`autobatch.search.local_workers`), and summarize (:mod:`autobatch.search.results`).

By default two objectives (throughput up, validation loss down; see
:mod:`autobatch.search.objectives` for ``goodput`` and ``time-to-target``) and one hard
constraint (``memory = peak / budget - 1 <= 0``). Trials that run out of memory stay
COMPLETE with finite placeholder values and a positive constraint, so the sampler learns
where the wall is; every trial also records what happened as user attrs, which is
what a person reads in optuna-dashboard.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

from autobatch._validation import Interval, StrOptions, validate_params
from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.core.memory import MemoryBudget, describe_budget, format_bytes
from autobatch.errors import InvalidParameterError, StorageError
from autobatch.process.worker import TrialWorker
from autobatch.search.coordination import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    complete_trial_count,
    create_once,
)
from autobatch.search.fidelity import RUNGS, FidelityPlan
from autobatch.search.horizon import DEFAULT_HORIZON, Horizon
from autobatch.search.local_workers import (
    check_worker_options,
    check_workers_fit,
    default_budget,
    run_local_workers,
    worker_spec,
    workers_per_device,
)
from autobatch.search.new_study import StudyPlan, announce, load_with_sampler
from autobatch.search.note import write_note
from autobatch.search.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, PRUNERS, get_objective, make_pruner
from autobatch.search.probe import ProbeResult
from autobatch.search.results import TrialRecord, TuneResult, summarize
from autobatch.search.runner import SearchRunner
from autobatch.search.space import SearchSpace
from autobatch.search.storage import DEFAULT_STORAGE, open_storage, redact, remove_if_empty, storage_file_exists

SAMPLERS = ("tpe", "nsga2", "gp", "random")
DEFAULT_PRUNER = "successive-halving"


@validate_params(
    {
        "n_trials": [Interval(int, 1, None), None],
        "timeout": [Interval(float, 0, None, closed="neither", unit="seconds"), None],
        "loss_tolerance": Interval(float, 0, None, closed="left", hint="0.02 means 2%"),
        "safety_margin": Interval(float, 0, 0.5, closed="left", hint="0.05 means 5%"),
        "sampler": StrOptions(SAMPLERS),
        "objective": [StrOptions(OBJECTIVES), None],
        "pruner": [StrOptions(PRUNERS), None],
        "max_trial_samples": [Interval(int, 1, None), None],
    }
)
def tune(
    task: Any,
    backend: str | None = None,
    *,
    memory_budget: str | int | MemoryBudget | None = None,
    n_trials: int | None = 20,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    search_space: SearchSpace | None = None,
    sampler: str = "tpe",
    seed: int | None = 0,
    loss_tolerance: float = 0.02,
    safety_margin: float = 0.05,
    trial_budget: TrialBudget | None = None,
    device: str | None = None,
    trial_timeout: float | None = None,
    on_trial: Callable[[TrialRecord], None] | None = None,
    on_probe: Callable[[int, TrialResult], None] | None = None,
    n_workers: int = 1,
    study_trials: int | None = None,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = DEFAULT_GRACE_PERIOD,
    objective: str | None = None,
    pruner: str | None = None,
    horizon: str | Horizon | None = None,
    max_trial_samples: int | None = None,
) -> TuneResult:
    """Find the micro-batch, accumulation and learning rate that train ``task`` fastest within budget.

    Runs ``n_trials`` search trials (or until ``timeout`` seconds), each in a worker
    process under ``memory_budget`` (default: 90% of the device; see
    :class:`MemoryBudget`). The study lives in ``storage`` (default: ``autobatch.db``
    in the working directory); the same ``study_name`` resumes it without probing again.

    Many processes may run ``tune`` on one study at once, on one machine or many (a
    PostgreSQL storage): the study is created and probed once, and each process adds
    trials. ``n_workers`` starts that many local worker processes (one GPU each where
    there are several) that share ``n_trials`` between them; ``study_trials`` stops once
    the study holds that many complete trials, whoever ran them. Running trials send a
    heartbeat every ``heartbeat_interval`` s; one silent for ``grace_period`` s (its worker
    was killed) is failed and its config queued again. A trial stopped by Ctrl-C is
    failed and queued again too. Without ``memory_budget``, an existing study keeps its
    own. A task whose validation loss is NaN or infinite in every probe (at its own base
    learning rate) is an error: no configuration could be ranked.

    ``horizon`` (:mod:`autobatch.search.horizon`) is how long the user's real run trains:
    ``"3ep"``, ``"200k samples"``, ``"5000 steps"``, ``"2h"``; the recommendation is for
    that run. Without it, one epoch of the task's training split, and the result says so.
    Trials train toward it (:mod:`autobatch.search.fidelity`): all of it where ``timeout``
    (the study's time) allows, else the share that fits, and never more than
    ``max_trial_samples`` samples a trial where that is given; where they stop short, the
    loss at the horizon is predicted from each trial's learning curve.

    ``objective`` (:mod:`autobatch.search.objectives`): ``"horizon"`` (the default for a
    new study: the validation loss at the horizon, trials continued toward it by successive
    halving), ``"pareto"`` (throughput and validation loss after each trial's share of the
    horizon), ``"goodput"`` (throughput × statistical efficiency from the gradient noise
    scale) or ``"time-to-target"`` (validation loss within ``trial_budget.train_seconds`` of
    training). ``pruner``: ``"successive-halving"`` (default), ``"hyperband"`` or ``"none"``
    stops weak trials at intermediate evaluations (horizon, time-to-target). Without them, an
    existing study keeps its own. Every trial that accumulates estimates the gradient noise
    scale; the note reports the critical batch size.
    """
    from autobatch.core.devices import default_device
    from autobatch.core.registry import backend_path
    from autobatch.tasks.loading import load_task, task_framework, task_path
    from autobatch.tasks.workload import Workload

    # Validate everything before touching the storage, so bad input leaves it as it was.
    if n_trials is None and timeout is None and study_trials is None:
        raise InvalidParameterError("n_trials", n_trials, "give n_trials, study_trials or timeout")
    check_worker_options(n_workers, study_trials, heartbeat_interval, grace_period)
    search_space = search_space or SearchSpace()
    trial_budget = trial_budget or TrialBudget()
    parsed_horizon = None if horizon is None else Horizon.parse(horizon)
    task = task_path(task)  # a factory given as an object travels to the workers by its import path
    workload = load_task(task)
    backend = task_framework(workload, backend)
    backend_path(backend)

    # The budget: as given, or the default share of the device.
    spread_gpus = device is None  # several local workers take a GPU each unless one is named
    device = device or default_device()
    budget, budget_bytes, budget_line = _resolve_budget(memory_budget, n_workers, device)
    check_workers_fit(n_workers, device, budget_bytes)
    settings: dict[str, Any] = {
        "task": task,
        "backend": backend,
        "device": device,
        "memory_budget_bytes": budget_bytes,
        "memory_budget": str(budget),
        "safety_margin": safety_margin,
        "loss_tolerance": loss_tolerance,
        "search_space": search_space.to_dict(),
        "trial_budget": trial_budget.to_dict(),
        "base_batch_size": workload.base_batch_size,
        "base_learning_rate": workload.base_learning_rate,
        "n_train": workload.n_train,
        # A task's optimizer is built in a trial: its family, and the rule it implies, come from the
        # first probe (StudyPlan._learn_from_probe) unless the task or the search space names the rule.
        "optimizer": workload.optimizer if isinstance(workload, Workload) else None,
        "objective": objective or DEFAULT_OBJECTIVE,
        "pruner": pruner or DEFAULT_PRUNER,
        "horizon": (parsed_horizon or DEFAULT_HORIZON).to_dict(),
        "horizon_given": parsed_horizon is not None,
        "max_trial_samples": max_trial_samples,
    }
    settings["lr_rule"] = _initial_rule(search_space, workload, settings["optimizer"], settings["objective"])
    _check_objective_settings(settings, trial_budget)

    def make_worker(cap_bytes: int) -> TrialWorker:
        # One worker per cap serves all its trials: the framework import and the data load are
        # paid once, and each trial still runs in a clean process of its own (process/worker.py).
        return TrialWorker(task, backend, memory_budget=cap_bytes, device=device)

    # The storage, and the study in it: probed and created by one process, joined by the others.
    storage_url = storage or DEFAULT_STORAGE
    study_name = study_name or default_study_name(task, backend)
    _quiet_optuna()
    storage_started = time.perf_counter()
    storage_existed = storage_file_exists(storage_url)
    storage_handle = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    storage_seconds = time.perf_counter() - storage_started
    plan = StudyPlan(
        settings, workload, search_space, trial_budget, make_worker, trial_timeout, on_probe, n_trials, timeout
    )

    def probe_and_create() -> None:
        announce(budget_line)
        plan.probe_and_create(storage_handle, study_name, sampler, seed)

    try:
        lock_grace = grace_period or DEFAULT_GRACE_PERIOD
        created = create_once(storage_handle, study_name, probe_and_create, lock_grace=lock_grace)
        study = load_with_sampler(storage_handle, study_name, sampler, seed)
        if not created:
            # A worker that names no objective, pruner, rule or horizon joins with the study's own.
            trial_budget = _adopt_study_settings(study, settings, trial_budget, search_space, objective, pruner)
            _adopt_study_horizon(study, settings, parsed_horizon)
        pruner_for_study = _study_pruner(settings, trial_budget)
        if pruner_for_study is not None:
            study.pruner = pruner_for_study
    except BaseException:
        remove_if_empty(storage_url, storage_existed)  # bad input leaves no new file behind
        raise
    if not created:
        if memory_budget is None:  # join the study on its own budget, not on this machine's default
            budget_line = _adopt_study_budget(study, settings)
        announce(budget_line)
        _check_same_kind(study, settings)

    # The search: here, or in local worker processes that report their trials here.
    probe = ProbeResult.from_dict(study.user_attrs["autobatch_probe"])
    search_space = _with_task_minimum(search_space, study.user_attrs.get("autobatch", {}))
    runner = SearchRunner(study, search_space, probe, settings, on_trial)
    if n_workers > 1:
        spec = worker_spec(
            settings,
            n_trials=None,
            timeout=timeout,
            storage=storage_url,
            study_name=study_name,
            sampler=sampler,
            seed=seed,
            trial_timeout=trial_timeout,
            study_trials=study_trials if study_trials is not None else _goal(study, n_trials),
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )
        run_local_workers(
            study, n_workers, spec, spread_gpus=spread_gpus, on_trial=on_trial, describe=runner.record_for
        )
    else:
        with make_worker(settings["memory_budget_bytes"]) as search_worker:

            def run_trial(config: TrialConfig, budget: TrialBudget, on_report=None) -> TrialResult:
                return search_worker.run(config, budget, timeout=trial_timeout, on_report=on_report)

            runner.optimize(run_trial, n_trials, timeout, study_trials)
    result = summarize(study, redact(storage_url))
    result.costs["storage_open_seconds"] = storage_seconds
    write_note(study, result)
    return result


def default_study_name(task: str, backend: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{task}-{backend}").strip("-")


def _initial_rule(search_space: SearchSpace, task, optimizer: str | None, objective: str) -> str | None:
    """The learning-rate rule as far as it is known before any trial: the search space's, the task's,
    goodput's, or the optimizer family's; ``None`` until a probe has built the task's optimizer."""
    if search_space.lr_rule:
        return search_space.lr_rule
    if getattr(task, "lr_rule", None):
        return task.lr_rule
    if optimizer is None and objective != "goodput":
        return None
    return search_space.rule_for(optimizer or "adam", objective)


def _with_task_minimum(search_space: SearchSpace, stored: dict) -> SearchSpace:
    """The space without micro-batches the task's model cannot train on (one sample under BatchNorm)."""
    smallest = int(stored.get("task_min_micro_batch", 1))
    if smallest <= search_space.min_micro_batch:
        return search_space
    return dataclasses.replace(search_space, min_micro_batch=smallest)


def _resolve_budget(memory_budget, n_workers: int, device: str) -> tuple[MemoryBudget, int, str | None]:
    """The budget, its bytes on ``device``, and the line that says which budget applies and why.

    No line when the budget was given in bytes: it says all there is to say.
    """
    given = memory_budget is not None
    budget = MemoryBudget.parse(memory_budget if given else default_budget(n_workers, device))
    budget_bytes = budget.resolve(device)
    if budget.nbytes is not None and given:
        return budget, budget_bytes, None
    reason = None if given else _default_budget_reason(n_workers, device)
    return budget, budget_bytes, describe_budget(budget, device, budget_bytes, reason)


def _default_budget_reason(n_workers: int, device: str) -> str:
    sharing = workers_per_device(n_workers, device)
    shared = f", {sharing} local workers sharing the device" if sharing > 1 else ""
    return f"the default on {device}, as no memory budget was given{shared}"


def _check_objective_settings(settings: dict, trial_budget: TrialBudget) -> None:
    """What an objective needs from the rest of the settings, checked before anything is written."""
    objective = settings["objective"]
    if objective == "time-to-target" and trial_budget.train_seconds is None:
        raise InvalidParameterError(
            "train_seconds",
            None,
            "objective='time-to-target' trains every trial for a fixed time: give trial_budget="
            "TrialBudget(train_seconds=...) (autobatch tune --train-seconds)",
        )
    if objective == "goodput" and settings["lr_rule"] == "absolute":
        raise InvalidParameterError(
            "lr_rule",
            "absolute",
            "objective='goodput' cannot rank learning rates, so the learning rate follows a rule: "
            "use 'adascale' (its default), 'linear' or 'sqrt'",
        )


def _adopt_study_settings(study, settings: dict, trial_budget: TrialBudget, space: SearchSpace, objective, pruner):
    """Settings this worker left open, taken from the stored study; returns the trial budget to use."""
    stored = study.user_attrs.get("autobatch", {})
    if objective is None:
        settings["objective"] = stored.get("objective", "pareto")  # studies from before objectives are pareto
    if pruner is None:
        settings["pruner"] = stored.get("pruner", DEFAULT_PRUNER)
    if settings.get("optimizer") is None:  # the family the study's probe read off the task's optimizer
        settings["optimizer"] = stored.get("optimizer")
    if space.lr_rule is None and stored.get("lr_rule"):
        settings["lr_rule"] = stored["lr_rule"]
    elif space.lr_rule is None:
        settings["lr_rule"] = space.rule_for(settings["optimizer"] or "adam", settings["objective"])
    stored_budget = stored.get("trial_budget", {})
    if trial_budget.train_seconds is None and stored_budget.get("train_seconds") is not None:
        trial_budget = dataclasses.replace(
            trial_budget, train_seconds=stored_budget["train_seconds"], evaluations=stored_budget.get("evaluations", 4)
        )
        settings["trial_budget"] = trial_budget.to_dict()
    _check_objective_settings(settings, trial_budget)
    return trial_budget


def _adopt_study_horizon(study, settings: dict, given: Horizon | None) -> None:
    """Join with the study's horizon and the trial lengths planned for it; a different horizon is refused."""
    stored = study.user_attrs.get("autobatch", {})
    if given is not None and stored.get("horizon_given") and Horizon.from_dict(stored["horizon"]) != given:
        raise StorageError(
            f"study_name={study.study_name!r} was made for horizon={str(Horizon.from_dict(stored['horizon']))!r}, "
            f"not {str(given)!r}; use another study name to search for a different run"
        )
    for key in ("horizon", "horizon_given", "fidelity", "max_trial_samples"):
        if key in stored:
            settings[key] = stored[key]
    if "horizon" not in stored:  # a study from before horizons trained every trial the same samples
        settings["fidelity"] = None


def _adopt_study_budget(study, settings: dict) -> str:
    """Take the stored study's memory budget into ``settings``; returns the line that says so."""
    stored = study.user_attrs.get("autobatch", {})
    budget_bytes = stored.get("memory_budget_bytes", settings["memory_budget_bytes"])
    settings.update(memory_budget_bytes=budget_bytes, memory_budget=stored.get("memory_budget"))
    return f"memory budget {format_bytes(budget_bytes)}: study {study.study_name!r}'s own, as none was given"


def _check_same_kind(study, settings: dict) -> None:
    stored = study.user_attrs.get("autobatch")
    if stored is None or "autobatch_probe" not in study.user_attrs:
        raise StorageError(
            f"study_name={study.study_name!r} already exists and is not an autobatch study; choose another study name"
        )
    stored = {"objective": "pareto", **stored}  # studies from before objectives are pareto
    for key in ("task", "backend", "device", "memory_budget_bytes", "objective", "lr_rule"):
        if key == "lr_rule" and "lr_rule" not in stored:
            continue
        if stored.get(key) != settings[key]:
            raise StorageError(
                f"study_name={study.study_name!r} was made for {key}={stored.get(key)!r}, not {settings[key]!r}; "
                "use another study name to search a different setting"
            )


def _study_pruner(settings: dict, trial_budget: TrialBudget):
    """The pruner for a horizon or time-to-target study; None otherwise (no trial reports to one)."""
    if not get_objective(settings["objective"]).prunes:
        return None
    if settings.get("fidelity"):  # trials report the thousandths of their length trained
        return make_pruner(settings["pruner"], RUNGS, FidelityPlan.from_dict(settings["fidelity"]).first_step)
    return make_pruner(settings["pruner"], trial_budget.evaluations)


def _goal(study, n_trials: int | None) -> int | None:
    """The study-wide goal of local workers that share ``n_trials``: that many more finished trials."""
    return None if n_trials is None else complete_trial_count(study) + n_trials


def _quiet_optuna() -> None:
    """Our progress bar says what Optuna's INFO lines would, once per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
