"""The study: probe the memory wall, then search micro-batch × accumulation × LR with Optuna.

By default two objectives (throughput up, validation loss down; see
:mod:`autobatch.search.objectives` for ``goodput`` and ``time-to-target``) and one hard
constraint (``memory = peak / budget - 1 <= 0``). Trials that run out of memory stay
COMPLETE with finite placeholder values and a positive constraint, so the sampler learns
where the wall is; every trial also records what happened as user attrs, which is
what a person reads in optuna-dashboard.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from autobatch.search import distributed
from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.search.distributed import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    check_worker_options,
    check_workers_fit,
    complete_trial_count,
    create_once,
    default_budget,
    redact,
    remove_if_empty,
    run_local_workers,
)
from autobatch.errors import AutobatchError, InvalidParameterError, StorageError, first_line
from autobatch.core.memory import MemoryBudget, describe_budget, format_bytes
from autobatch.core.noise import pooled_noise_scale, statistical_efficiency
from autobatch.search.objectives import (
    PLACEHOLDER_LOSS,
    Objective,
    check_pruner,
    fastest_within_tolerance,
    get_objective,
    make_pruner,
    measured,
)
from autobatch.search.objectives import pareto_front as _measured_front
from autobatch.search.probe import ProbeResult, find_memory_wall
from autobatch.search.space import SearchSpace, scaled_learning_rate
from autobatch.process.telemetry import ATTR_KEYS, telemetry_attrs
from autobatch.process.worker import TrialWorker

DEFAULT_STORAGE = "sqlite:///autobatch.db"
#: the default (pareto) objective's metrics and directions
METRIC_NAMES = ["throughput (samples/s)", "validation loss"]
DIRECTIONS = ["maximize", "minimize"]
SAMPLERS = ("tpe", "nsga2", "gp", "random")
DEFAULT_PRUNER = "successive-halving"
#: the noise probe's accumulation: four micro-batches give |G_small|² a fair average per window
NOISE_PROBE_ACCUMULATION = 4
#: the constraint of an OOM trial when no better estimate of its demand exists
OOM_CONSTRAINT_FLOOR = 0.05
#: stop the study when the first trials all fail: the task is broken, not the configs
FAILURES_BEFORE_GIVING_UP = 3
#: the user attrs a trial's telemetry adds, which the recommendation carries for the advice
TELEMETRY_ATTRS = (*ATTR_KEYS, "telemetry_samples", "telemetry_note")
#: the last share of the trials in which every other trial refines the recommendation
REFINE_SHARE = 0.35


@dataclass
class TrialRecord:
    """One finished search trial, as the progress callback and reports see it."""

    number: int
    config: TrialConfig
    result: TrialResult | None
    feasible: bool
    skipped_by_model: bool
    values: tuple[float, ...] | None  # the objective's: (throughput, loss), (goodput,) or (loss within time,)
    pruned: bool = False


@dataclass
class TuneResult:
    """What a study found. ``study`` is the Optuna study, for anything beyond this summary."""

    recommended: dict | None
    pareto_front: list[dict]
    max_micro_batch: int
    study: Any
    storage: str
    memory_budget_bytes: int
    n_trials: int
    n_oom_trials: int
    n_failed_trials: int
    probe: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    objective: str = "pareto"
    n_pruned_trials: int = 0
    #: the critical batch size: {"b_simple", "trials", "windows", "per_trial_range", "probe"}; None if unmeasured
    noise_scale: dict | None = None

    @property
    def study_name(self) -> str:
        return self.study.study_name

    def to_dict(self) -> dict:
        return {
            "recommended": self.recommended,
            "max_micro_batch": self.max_micro_batch,
            "pareto_front": self.pareto_front,
            "n_trials": self.n_trials,
            "n_oom_trials": self.n_oom_trials,
            "n_failed_trials": self.n_failed_trials,
            "study_name": self.study_name,
            "storage": self.storage,
            "memory_budget_bytes": self.memory_budget_bytes,
            "probe": self.probe,
            "costs": self.costs,
            "objective": self.objective,
            "n_pruned_trials": self.n_pruned_trials,
            "noise_scale": self.noise_scale,
        }


def tune(
    task: str,
    backend: str = "torch",
    *,
    memory_budget: "str | int | MemoryBudget | None" = None,
    n_trials: int | None = 20,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    search_space: SearchSpace | None = None,
    sampler: str = "tpe",
    seed: int = 0,
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

    ``objective`` (:mod:`autobatch.search.objectives`): ``"pareto"`` (throughput and validation
    loss; the default for a new study), ``"goodput"`` (throughput × statistical
    efficiency from the gradient noise scale) or ``"time-to-target"`` (validation loss
    within ``trial_budget.train_seconds`` of training, with ``pruner``
    ``"successive-halving"`` (default), ``"hyperband"`` or ``"none"`` stopping weak trials
    at intermediate evaluations). Without them, an existing study keeps its own. Every
    trial that accumulates estimates the gradient noise scale; the note reports the
    critical batch size.
    """
    from autobatch.core.devices import default_device
    from autobatch.core.registry import backend_path
    from autobatch.tasks.workload import load_workload

    # Validate everything before touching the storage, so bad input leaves it as it was.
    if n_trials is None and timeout is None and study_trials is None:
        raise InvalidParameterError("n_trials", n_trials, "give n_trials, study_trials or timeout")
    check_worker_options(n_workers, study_trials, heartbeat_interval, grace_period)
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise InvalidParameterError("n_trials", n_trials, "must be an integer >= 1")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidParameterError("timeout", timeout, "must be a number of seconds > 0")
    if not (isinstance(loss_tolerance, (int, float)) and math.isfinite(loss_tolerance) and loss_tolerance >= 0):
        raise InvalidParameterError("loss_tolerance", loss_tolerance, "must be a number >= 0 (0.02 means 2%)")
    if not (isinstance(safety_margin, (int, float)) and 0 <= safety_margin < 0.5):
        raise InvalidParameterError("safety_margin", safety_margin, "must lie in [0, 0.5) (0.05 means 5%)")
    if sampler not in SAMPLERS:
        raise InvalidParameterError("sampler", sampler, f"must be one of {SAMPLERS}")
    if objective is not None:
        get_objective(objective)
    if pruner is not None:
        check_pruner(pruner)
    search_space = search_space or SearchSpace()
    trial_budget = trial_budget or TrialBudget()
    backend_path(backend)
    workload = load_workload(task)
    spread_gpus = device is None  # several local workers take a GPU each unless one is named
    device = device or default_device()
    budget = MemoryBudget.parse(memory_budget if memory_budget is not None else default_budget(n_workers, device))
    budget_bytes = budget.resolve(device)
    budget_line = None if budget.nbytes is not None and memory_budget is not None else describe_budget(
        budget, device, budget_bytes, None if memory_budget is not None else _default_budget_reason(n_workers, device)
    )
    check_workers_fit(n_workers, device, budget_bytes)
    storage_url = storage or DEFAULT_STORAGE
    study_name = study_name or default_study_name(task, backend)
    settings = {
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
        "optimizer": workload.optimizer,
        "objective": objective or "pareto",
        "pruner": pruner or DEFAULT_PRUNER,
        "lr_rule": search_space.rule_for(workload.optimizer, objective or "pareto"),
    }
    _check_objective_settings(settings, trial_budget)

    # One worker per cap serves all trials: the framework import and the data load are
    # paid once, and each trial still runs in a clean process of its own (worker.py).
    search_worker = TrialWorker(task, backend, memory_budget=budget_bytes, device=device)

    def run(config: TrialConfig, on_report=None) -> TrialResult:
        return search_worker.run(config, trial_budget, timeout=trial_timeout, on_report=on_report)

    _quiet_optuna()
    storage_started = time.perf_counter()
    storage_existed = _storage_file_exists(storage_url)
    storage_handle = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    storage_seconds = time.perf_counter() - storage_started

    def probe_and_create() -> None:
        announce(budget_line)
        # Runs once per study, in the one process holding its probe lock (see distributed.py).
        probe_limit = int(budget_bytes * (1 - safety_margin))
        probe_worker = TrialWorker(task, backend, memory_budget=probe_limit, device=device)

        def run_probe(micro_batch: int) -> TrialResult:
            # Probes run under the budget less the margin, so whatever fits there leaves the
            # margin free under the real budget: the cap is what counts, not a reading.
            # A probe trains and evaluates exactly as a search trial will: the peak also
            # depends on the optimizer's state, evaluation, and the allocator's
            # fragmentation when training resumes after it (a shorter probe was seen to
            # pass at a micro-batch whose full trial then ran out of memory). A time budget
            # is run as a sample budget here: the peak depends on the config, not on how
            # long it trains, and near the wall the few windows leave timing windows that
            # resume training after evaluation, as a time-budgeted trial does.
            config = TrialConfig(micro_batch, 1, workload.base_learning_rate)
            result = probe_worker.run(config, probe_budget, timeout=trial_timeout)
            if result.status == "ok" and result.val_loss is not None:
                probe_losses.append(result.val_loss)
            return result

        probe_losses: list[float] = []
        probe_budget = dataclasses.replace(trial_budget, train_seconds=None)

        # A micro-batch larger than the training split would repeat samples within one
        # forward pass: the split's size is the natural ceiling unless the user sets one.
        ceiling = search_space.max_micro_batch or len(workload.x_train)
        noise = None
        with probe_worker:  # the noise probe, if any, reuses the worker the memory probe started
            probe = find_memory_wall(
                run_probe,
                budget_bytes,
                safety_margin=safety_margin,
                upper_limit=ceiling,
                on_probe=on_probe,
            )
            if search_space.min_micro_batch > probe.max_micro_batch:
                raise InvalidParameterError(
                    "min_micro_batch",
                    search_space.min_micro_batch,
                    f"must be <= {probe.max_micro_batch}, the largest micro-batch that fits the memory budget",
                )
            if probe_losses and not any(math.isfinite(loss) for loss in probe_losses):
                # The task's own base learning rate is meant to train: a loss that is NaN there
                # is a broken task (or NaN in its data), and no trial could be ranked.
                raise AutobatchError(
                    f"task={task!r}: the validation loss is {probe_losses[0]} in every probe, at the task's own "
                    f"base learning rate {workload.base_learning_rate:g}; check the task's model, loss and data for NaN"
                )
            if _needs_noise_probe(settings):
                noise = _probe_noise_scale(probe_worker, workload, probe.max_micro_batch, trial_budget, trial_timeout)
        new_study = _create_study(storage_handle, study_name, sampler, seed, get_objective(settings["objective"]))
        new_study.set_user_attr("autobatch", settings)
        if noise is not None:
            new_study.set_user_attr("autobatch_noise", noise)
        _enqueue_starting_points(new_study, search_space, probe.max_micro_batch, workload, settings, noise)
        new_study.set_user_attr("autobatch_probe", probe.to_dict())  # last: the study is ready to join

    try:
        lock_grace = grace_period or DEFAULT_GRACE_PERIOD
        created = create_once(storage_handle, study_name, probe_and_create, lock_grace=lock_grace)
        study = _with_sampler(storage_handle, study_name, sampler, seed)
        if not created:
            # A worker that names no objective, pruner or rule joins with the study's own.
            trial_budget = _adopt_study_settings(study, settings, trial_budget, search_space, objective, pruner)
        pruner_for_study = _study_pruner(settings, trial_budget)
        if pruner_for_study is not None:
            study.pruner = pruner_for_study
    except BaseException:
        remove_if_empty(storage_url, storage_existed)  # bad input leaves no new file behind
        raise
    if not created:
        if memory_budget is None:  # join the study on its own budget, not on this machine's default
            stored = study.user_attrs.get("autobatch", {})
            budget_bytes = stored.get("memory_budget_bytes", budget_bytes)
            settings.update(memory_budget_bytes=budget_bytes, memory_budget=stored.get("memory_budget"))
            search_worker.close()
            search_worker = TrialWorker(task, backend, memory_budget=budget_bytes, device=device)
            budget_line = f"memory budget {format_bytes(budget_bytes)}: study {study_name!r}'s own, as none was given"
        announce(budget_line)
        _check_same_kind(study, settings)
    probe = ProbeResult.from_dict(study.user_attrs["autobatch_probe"])

    if n_workers > 1:
        goal = None if n_trials is None else complete_trial_count(study) + n_trials
        worker_kwargs = dict(
            task=task, backend=backend, memory_budget=budget_bytes, n_trials=None, timeout=timeout,
            storage=storage_url, study_name=study_name, search_space=search_space.to_dict(), sampler=sampler,
            seed=seed, loss_tolerance=loss_tolerance, safety_margin=safety_margin,
            trial_budget=trial_budget.to_dict(), device=device, trial_timeout=trial_timeout,
            study_trials=goal if study_trials is None else study_trials,
            heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            objective=settings["objective"], pruner=settings["pruner"],
        )
        describe = _SearchRunner(study, search_space, probe, settings, run, on_trial).record_for
        run_local_workers(
            study, n_workers, worker_kwargs, spread_gpus=spread_gpus, on_trial=on_trial, describe=describe
        )
    else:
        runner = _SearchRunner(study, search_space, probe, settings, run, on_trial)
        with search_worker:
            runner.optimize(n_trials, timeout, study_trials)
    result = summarize(study, redact(storage_url))
    result.costs["storage_open_seconds"] = storage_seconds
    write_note(study, result)
    return result


def announce(line: str | None) -> None:
    """Print ``line`` on stderr, above a progress bar if one is showing (which budget, and why)."""
    if not line:
        return
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def _default_budget_reason(n_workers: int, device: str) -> str:
    sharing = distributed.workers_per_device(n_workers, device)
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


def _needs_noise_probe(settings: dict) -> bool:
    """Goodput and the adascale rule need B_noise before the first trial: a noise probe measures it."""
    return settings["objective"] == "goodput" or settings["lr_rule"] == "adascale"


def _probe_noise_scale(worker: TrialWorker, workload, wall: int, trial_budget: TrialBudget, timeout) -> dict:
    """One trial at the task's base batch × NOISE_PROBE_ACCUMULATION, at its base learning rate, for B_noise.

    Measured once, when the study is created, and kept: goodput ranks every trial and the
    adascale rule maps every trial's params to a learning rate with this one number, so
    re-estimating it as trials come in would change the meaning of earlier trials.
    """
    micro = max(1, min(wall, workload.base_batch_size))
    config = TrialConfig(micro, NOISE_PROBE_ACCUMULATION, workload.base_learning_rate)
    budget = dataclasses.replace(trial_budget, train_seconds=None, measure_noise=True)
    started = time.perf_counter()
    result = worker.run(config, budget, timeout=timeout)
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
        + (f"~ {estimate:.0f} samples" if estimate is not None else "too large to measure at this batch (unbounded)")
    )
    return noise


def study_noise_scale(study) -> float | None:
    """The B_noise goodput and the adascale rule use: the noise probe's, ``math.inf`` when unbounded.

    None when the study has no noise probe (its objective and rule need none).
    """
    noise = study.user_attrs.get("autobatch_noise")
    if noise is None:
        return None
    estimate = noise.get("b_simple")
    return math.inf if estimate is None else float(estimate)


def _adopt_study_settings(study, settings: dict, trial_budget: TrialBudget, space: SearchSpace, objective, pruner):
    """Settings this worker left open, taken from the stored study; returns the trial budget to use."""
    stored = study.user_attrs.get("autobatch", {})
    if objective is None:
        settings["objective"] = stored.get("objective", "pareto")  # studies from before objectives are pareto
    if pruner is None:
        settings["pruner"] = stored.get("pruner", DEFAULT_PRUNER)
    if space.lr_rule is None and stored.get("lr_rule"):
        settings["lr_rule"] = stored["lr_rule"]
    elif space.lr_rule is None:
        settings["lr_rule"] = space.rule_for(settings["optimizer"], settings["objective"])
    stored_budget = stored.get("trial_budget", {})
    if trial_budget.train_seconds is None and stored_budget.get("train_seconds") is not None:
        trial_budget = dataclasses.replace(
            trial_budget, train_seconds=stored_budget["train_seconds"], evaluations=stored_budget.get("evaluations", 4)
        )
        settings["trial_budget"] = trial_budget.to_dict()
    _check_objective_settings(settings, trial_budget)
    return trial_budget


def _study_pruner(settings: dict, trial_budget: TrialBudget):
    """The pruner for a time-to-target study; None otherwise (no trial reports to one)."""
    if not get_objective(settings["objective"]).prunes:
        return None
    return make_pruner(settings["pruner"], trial_budget.evaluations)


def _quiet_optuna() -> None:
    """Our progress bar says what Optuna's INFO lines would, once per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def default_study_name(task: str, backend: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{task}-{backend}").strip("-")


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for ``url``, with errors that say what is wrong with it.

    SQLite, PostgreSQL or a journal file; see :mod:`autobatch.search.distributed` for the URL
    forms, the start-up lock and the heartbeat that re-queues a lost worker's trial.
    """
    return distributed.open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)


def _storage_file_exists(url: str) -> bool:
    path = distributed.sqlite_path(distributed.normalize_storage_url(url))
    return path is None or path.exists()


def load_existing_study(url: str, study_name: str):
    """The stored study ``study_name``, or None when there is none (without creating anything)."""
    import optuna

    if not _storage_file_exists(url):
        return None  # opening would create the file: there is nothing to load
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def load_study_result(storage: str, study_name: str) -> TuneResult:
    """The summary of a stored study, as :func:`tune` returns it (for ``autobatch show``)."""
    study = load_existing_study(storage, study_name)
    if study is None:
        raise StorageError(f"study_name={study_name!r}: no such study in {redact(storage)!r}")
    if "autobatch" not in study.user_attrs:
        raise StorageError(f"study_name={study_name!r} in {redact(storage)!r} is not an autobatch study")
    return summarize(study, redact(storage))


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


def _make_sampler(name: str, seed: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _create_study(storage, study_name: str, sampler: str, seed: int, objective: Objective | None = None):
    import warnings

    import optuna

    url = storage if isinstance(storage, str) else "the storage"
    storage = open_storage(storage) if isinstance(storage, str) else storage
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            directions=list(objective.directions) if objective else DIRECTIONS,
            sampler=_make_sampler(sampler, seed),
            load_if_exists=True,  # another worker may have created it a moment ago
        )
    except Exception as error:
        raise StorageError(f"storage={redact(url)!r}: cannot create study {study_name!r}: {first_line(error)}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objective.metric_names) if objective else METRIC_NAMES)
    return study


def _with_sampler(storage, study_name: str, sampler: str, seed: int | None):
    """The stored study, with this process's own sampler (samplers are not stored)."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=_make_sampler(sampler, seed))
    except KeyError:
        raise StorageError(f"study_name={study_name!r} was deleted while this worker joined it") from None


def _enqueue_starting_points(study, space: SearchSpace, wall: int, workload, settings: dict, noise: dict | None) -> None:
    """The wall at the rule's LR, and the task's base batch at its base LR."""
    low, high = space.micro_batch_bounds(wall)
    high = min(high, wall)  # tune() has checked that low <= wall
    base = min(max(workload.base_batch_size, low), high)
    rule = settings["lr_rule"]
    noise_scale = None if noise is None else (math.inf if noise.get("b_simple") is None else noise["b_simple"])
    rule_options = dict(rule=rule, noise_scale=noise_scale)
    pin = get_objective(settings["objective"]).pins_learning_rate

    def at_rule(micro: int) -> float:
        return scaled_learning_rate(
            workload.base_learning_rate, workload.base_batch_size, micro, rule, 0.0,
            noise_scale=noise_scale, optimizer=workload.optimizer,
        )

    for config in (TrialConfig(high, 1, at_rule(high)), TrialConfig(base, 1, at_rule(base))):
        if space.powers_of_two and config.micro_batch_size & (config.micro_batch_size - 1):
            config = TrialConfig(2 ** int(math.log2(config.micro_batch_size)), 1, config.learning_rate)
        params = space.params_for(
            config, workload.base_batch_size, workload.base_learning_rate, workload.optimizer,
            pin_learning_rate=pin, **rule_options,
        )
        study.enqueue_trial(params, skip_if_exists=True)


class _SearchRunner:
    """The ask → run in a worker → record → tell loop."""

    def __init__(self, study, space: SearchSpace, probe: ProbeResult, settings: dict, run, on_trial):
        self.study = study
        self.space = space
        self.probe = probe
        self.settings = settings
        self.run = run
        self.on_trial = on_trial
        self.failures_in_a_row = 0
        self.refinements = 0
        self.objective = get_objective(settings["objective"])
        self.noise_scale = study_noise_scale(study)

    def optimize(self, n_trials: int | None, timeout: float | None, study_trials: int | None = None) -> None:
        """Run ``n_trials`` here, or until ``timeout``, or until the study holds ``study_trials`` complete trials."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        done = 0
        while (n_trials is None or done < n_trials) and (timeout is None or time.monotonic() - started < timeout):
            elapsed_share = max(
                done / n_trials if n_trials else 0.0,
                (time.monotonic() - started) / timeout if timeout else 0.0,
                complete_trial_count(self.study) / study_trials if study_trials else 0.0,
            )
            # Refinement serves the pareto recommendation; a single objective's sampler homes in by itself.
            late = elapsed_share >= 1 - REFINE_SHARE and done % 2 == 1 and self.objective.name == "pareto"
            refine = self._enqueue_refinement if late else None
            # Under a study-wide goal the workers ask one at a time: together they run exactly that many.
            trial = distributed.claim_trial(self.study, study_trials, deadline, before_ask=refine)
            if trial is None:
                break  # the study holds study_trials complete trials
            with distributed.settled_on_interrupt(self.study, trial):
                self._one_trial(trial)
            done += 1

    def _enqueue_refinement(self) -> None:
        """Queue a small step from the current recommendation.

        A multi-objective sampler spreads its trials along the whole Pareto front, but
        the recommendation sits at one end of it (fastest within the loss tolerance).
        Late in the study every other trial steps from there: a larger micro-batch, the
        same effective batch with less accumulation, or a nudged learning rate.
        """
        incumbent = recommend(_feasible_front(self.study), self.settings["loss_tolerance"])
        if incumbent is None:
            return
        params = dict(incumbent.params)
        steps = _refinement_steps(params, self.space, self.probe.max_micro_batch)
        if not steps:
            return
        self.study.enqueue_trial(steps[self.refinements % len(steps)], skip_if_exists=True)
        self.refinements += 1

    def _one_trial(self, trial=None) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        if trial is None:
            trial = distributed.claim_trial(self.study, None, None)  # a queued config first, if any
        try:
            with distributed.trial_heartbeat(self.study, trial._trial_id):
                trial.set_user_attr("worker", distributed.worker_label())
                config = self._suggest(trial)
                budget_bytes = self.settings["memory_budget_bytes"]
                predicted = self.probe.memory_model.predict(config.micro_batch_size)
                # Up to the wall, the probe ran it under the margin-reduced cap: it fits. Past
                # the wall, the fitted model decides whether it is worth a run.
                skipped = config.micro_batch_size > self.probe.max_micro_batch and predicted > budget_bytes * (
                    1 - self.settings["safety_margin"]
                )
                result = None if skipped else self.run(config, self._reporter(trial))
        except KeyboardInterrupt:
            # The worker has killed the trial's process; FAIL it and queue it for a resumed study.
            reason = f"interrupted (Ctrl-C) in worker {distributed.worker_label()}"
            distributed.fail_interrupted_trial(self.study, trial, reason)
            raise
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)  # never leave it RUNNING
            raise
        efficiency = statistical_efficiency(
            self.noise_scale, config.effective_batch_size, self.settings["base_batch_size"]
        )
        attrs, values, constraint, failed = _trial_outcome(
            config, result, predicted, budget_bytes, self.settings, objective=self.objective, efficiency=efficiency
        )
        pruned = bool(not failed and result is not None and result.ok and result.pruned)
        try:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        except UpdateFinishedTrialError:
            return  # another worker declared it lost (no heartbeat for the grace period) and retries it
        if failed:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= FAILURES_BEFORE_GIVING_UP and self._nothing_succeeded():
                raise AutobatchError(
                    f"the first {self.failures_in_a_row} trials all failed; last reason: {attrs.get('error')}"
                )
        elif pruned:
            self.failures_in_a_row = 0
            trial.set_constraint("memory", constraint)
            # Optuna records the last intermediate loss as a pruned trial's value.
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.failures_in_a_row = 0
            trial.set_constraint("memory", constraint)
            self.study.tell(trial, list(values), skip_if_finished=True)
        if self.on_trial is not None:
            self.on_trial(
                TrialRecord(
                    number=trial.number,
                    config=config,
                    result=result,
                    feasible=bool(attrs["feasible"]),
                    skipped_by_model=skipped,
                    values=None if failed or pruned else values,
                    pruned=pruned,
                )
            )
        with distributed.study_lock(self.study):  # workers take turns: a note is several storage rows
            write_note(self.study, summarize(self.study, ""), during_search=True)

    def _suggest(self, trial) -> TrialConfig:
        return self.space.suggest(
            trial,
            self.probe.max_micro_batch,
            self.settings["base_batch_size"],
            self.settings["base_learning_rate"],
            self.settings["optimizer"],
            rule=self.settings["lr_rule"],
            noise_scale=self.noise_scale,
            pin_learning_rate=self.objective.pins_learning_rate,
        )

    def _reporter(self, trial):
        """What answers a time-budgeted trial's intermediate losses: the study's pruner, if the objective prunes."""
        if not self.objective.prunes:
            return None

        def report(step: int, val_loss: float, train_seconds: float) -> bool:
            trial.report(val_loss, step)
            return trial.should_prune()

        return report

    def _nothing_succeeded(self) -> bool:
        from optuna.trial import TrialState

        return not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))

    def record_for(self, trial) -> TrialRecord | None:
        """A finished trial of another process, as ``on_trial`` sees this process's own."""
        from optuna.trial import FixedTrial, TrialState

        attrs = trial.user_attrs
        try:
            config = self._suggest(FixedTrial(trial.params))
        except Exception:
            return None  # stopped before its config was drawn
        failed = trial.state == TrialState.FAIL
        result = None
        if not attrs.get("skipped_by_model"):
            status = attrs.get("status", "error")
            result = TrialResult(
                status=status if status in ("ok", "oom", "error", "timeout") else "error",
                config=config,
                oom_phase=attrs.get("oom_phase"),
                error=attrs.get("error") or ("its worker stopped" if failed else None),
            )
        return TrialRecord(
            number=trial.number,
            config=config,
            result=result,
            feasible=bool(attrs.get("feasible")),
            skipped_by_model=bool(attrs.get("skipped_by_model")),
            values=None if failed or trial.values is None else tuple(trial.values),
            pruned=trial.state == TrialState.PRUNED,
        )


def _refinement_steps(params: dict, space: SearchSpace, wall: int) -> list[dict]:
    """Neighbours of an incumbent's params, in the order they are tried."""
    steps = []
    if "micro_batch_log2" in params:
        if 2 ** (params["micro_batch_log2"] + 1) <= wall:
            steps.append({**params, "micro_batch_log2": params["micro_batch_log2"] + 1})
    else:
        micro = params["micro_batch_size"]
        larger = min(wall, max(micro + 1, round(micro * 1.2)))
        if larger > micro:
            steps.append({**params, "micro_batch_size": larger})
        accumulation = params["accumulation_steps"]
        if accumulation >= 2 and micro * 2 <= wall:
            steps.append({**params, "micro_batch_size": micro * 2, "accumulation_steps": accumulation // 2})
    if "lr_offset_decades" in params:
        low, high = space.lr_offset_range
        for nudge in (0.15, -0.15):
            offset = min(high, max(low, params["lr_offset_decades"] + nudge))
            steps.append({**params, "lr_offset_decades": offset})
    elif "learning_rate" in params:
        low, high = space.lr_range
        for factor in (1.4, 1 / 1.4):
            steps.append({**params, "learning_rate": min(high, max(low, params["learning_rate"] * factor))})
    return steps


def _feasible_front(study) -> list:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return pareto_front([t for t in complete if _is_feasible(t)])


def _is_feasible(trial) -> bool:
    return bool(trial.user_attrs.get("feasible")) and not trial.user_attrs.get("diverged") and trial.values is not None


def _trial_outcome(
    config: TrialConfig,
    result: TrialResult | None,
    predicted: float,
    budget_bytes: int,
    settings: dict,
    *,
    objective: Objective | None = None,
    efficiency: float = 1.0,
):
    """(user attrs, objective values, memory constraint, failed?) for one search trial.

    ``efficiency`` is the statistical efficiency of the trial's effective batch, which
    the goodput objective multiplies throughput by.
    """
    objective = objective or get_objective(settings.get("objective", "pareto"))
    attrs: dict[str, Any] = {
        "micro_batch_size": config.micro_batch_size,
        "accumulation_steps": config.accumulation_steps,
        "effective_batch_size": config.effective_batch_size,
        "learning_rate": config.learning_rate,
        "memory_budget_bytes": budget_bytes,
        "predicted_peak_bytes": int(predicted),
        "framework": settings["backend"],
        "device": settings["device"],
        "skipped_by_model": result is None,
        "oom": False,
        "oom_phase": None,
        "diverged": False,
    }
    if result is None:
        constraint = predicted / budget_bytes - 1
        attrs.update(status="skipped", feasible=False, peak_memory_bytes=None)
        return attrs, objective.placeholder(), constraint, False
    attrs.update(
        status=result.status,
        peak_memory_bytes=result.peak_memory_bytes,
        baseline_memory_bytes=result.baseline_memory_bytes,
        samples_per_second=result.samples_per_second,
        val_loss=result.val_loss,
        timings={k: round(v, 4) for k, v in result.timings.items()},
        framework=result.framework or settings["backend"],
        device=result.device or settings["device"],
    )
    attrs.update(telemetry_attrs(result.telemetry))  # peak device memory, mean utilization (autobatch.process.telemetry)
    if result.gradient_noise:
        attrs.update(noise_scale=result.noise_scale, gradient_noise=result.gradient_noise)
    if result.intermediate_losses:
        attrs.update(intermediate_losses=result.intermediate_losses, pruned=result.pruned)
    if result.error:
        attrs["error"] = result.error.splitlines()[0][:500]
    if result.status == "oom":
        estimate = max(predicted, result.peak_memory_bytes or 0) / budget_bytes - 1
        attrs.update(oom=True, oom_phase=result.oom_phase, feasible=False)
        return attrs, objective.placeholder(), max(estimate, OOM_CONSTRAINT_FLOOR), False
    if result.status != "ok":
        attrs["feasible"] = False
        return attrs, None, None, True
    # The trial ran to the end under the real cap, so it fits: a reading a little over
    # the budget is the estimate's error (the CPU peak is estimated, see trial_child).
    constraint = min((result.peak_memory_bytes or 0) / budget_bytes - 1, 0.0)
    attrs["feasible"] = True
    throughput = float(result.samples_per_second or 0.0)
    loss = result.val_loss
    if loss is None or not math.isfinite(loss):
        attrs["diverged"] = True  # a bad learning rate is an outcome the sampler should learn from
        if objective.name == "pareto":  # the throughput was real; only the loss is a placeholder
            return attrs, (throughput, PLACEHOLDER_LOSS), constraint, False
        return attrs, objective.placeholder(), constraint, False
    if objective.name == "goodput":
        attrs.update(statistical_efficiency=efficiency, goodput=throughput * efficiency)
    return attrs, objective.values(throughput, float(loss), efficiency), constraint, False


def summarize(study, storage: str) -> TuneResult:
    """Recommendation and feasible Pareto front from what the study holds now."""
    from optuna.trial import TrialState

    settings = study.user_attrs.get("autobatch", {})
    probe = study.user_attrs.get("autobatch_probe", {})
    objective = get_objective(settings.get("objective", "pareto"))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    feasible = [t for t in complete if _is_feasible(t)]
    front = pareto_front(feasible)
    recommended = objective.recommend(feasible, settings.get("loss_tolerance", 0.02))
    timings = [t.user_attrs.get("timings", {}) for t in complete if t.user_attrs.get("timings")]
    costs = {}
    for key in ("worker_start", "framework_import", "task_load", "trial", "wall"):
        values = [timing[key] for timing in timings if key in timing]
        if values:
            costs[f"mean_{key}_seconds"] = sum(values) / len(values)
    return TuneResult(
        recommended=_describe(recommended) if recommended else None,
        pareto_front=[_describe(t) for t in sorted(front, key=lambda t: -t.values[0])],
        max_micro_batch=int(probe.get("max_micro_batch", 0)),
        study=study,
        storage=storage,
        memory_budget_bytes=int(settings.get("memory_budget_bytes", 0)),
        n_trials=len(complete) + len(pruned) + sum(1 for t in trials if t.state == TrialState.FAIL),
        n_oom_trials=sum(1 for t in complete if t.user_attrs.get("oom")),
        n_failed_trials=sum(1 for t in trials if t.state == TrialState.FAIL),
        probe=probe,
        costs=costs,
        objective=objective.name,
        n_pruned_trials=len(pruned),
        noise_scale=critical_batch_size(study, [*complete, *pruned]),
    )


def critical_batch_size(study, trials: list) -> dict | None:
    """The gradient noise scale pooled over the trials that measured it and the noise probe.

    Trials train at different learning rates, so their estimates differ; the pooled
    one (|G|² and tr(Σ) averaged over every measured window before their ratio) is the
    study's estimate of the critical batch size, and the per-trial range shows the spread.
    """
    summaries = [t.user_attrs["gradient_noise"] for t in trials if t.user_attrs.get("gradient_noise")]
    probe = study.user_attrs.get("autobatch_noise")
    pooled = pooled_noise_scale([*summaries, *([probe] if probe else [])])
    if pooled is None:
        return None
    if probe is not None:
        pooled["probe"] = probe.get("b_simple")
    return pooled


def pareto_front(trials: list) -> list:
    """Trials no other trial beats on both throughput (higher) and loss (lower)."""
    return _measured_front(trials)


def recommend(front: list, loss_tolerance: float):
    """The fastest feasible Pareto trial whose loss is within ``loss_tolerance`` of the best loss."""
    return fastest_within_tolerance(front, loss_tolerance)


def _describe(trial) -> dict:
    attrs = trial.user_attrs
    throughput, val_loss = measured(trial)
    described = {
        "trial_number": trial.number,
        "micro_batch_size": attrs["micro_batch_size"],
        "accumulation_steps": attrs["accumulation_steps"],
        "learning_rate": attrs["learning_rate"],
        "effective_batch_size": attrs["effective_batch_size"],
        "throughput": throughput,
        "val_loss": val_loss,
        "peak_memory_bytes": attrs.get("peak_memory_bytes"),
        "telemetry": {key: value for key, value in attrs.items() if key in TELEMETRY_ATTRS},
    }
    for key in ("goodput", "statistical_efficiency", "noise_scale"):
        if key in attrs:
            described[key] = attrs[key]
    return described


def write_note(study, result: TuneResult, *, during_search: bool = False) -> None:
    """Keep the study's note and plots in optuna-dashboard current (when optuna-dashboard is installed).

    ``during_search``: after a trial, when redrawing the plots may wait a little (see plots.py).
    """
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    from autobatch.report.plots import save_dashboard_plots_quietly
    from autobatch.search.note import study_note

    save_note(study, study_note(study, result))
    save_dashboard_plots_quietly(study, result, throttle=during_search)
