"""What a study found: the records of its trials, its summary, the recommendation and the front.

Read from the study as stored, by whichever process asks: :func:`summarize` after a
search and for the note, :func:`load_study_result` for ``autobatch show``. Also here:
:func:`trial_outcome`, which turns one trial's result into the user attrs, values and
memory constraint that Optuna stores (so what is stored and what is read sit together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from autobatch.core.config import TrialConfig, TrialResult
from autobatch.core.noise import pooled_noise_scale
from autobatch.errors import StorageError
from autobatch.process.telemetry import ATTR_KEYS, telemetry_attrs
from autobatch.search.objectives import (
    PLACEHOLDER_LOSS,
    Objective,
    fastest_within_tolerance,
    get_objective,
    measured,
)
from autobatch.search.objectives import pareto_front as _measured_front
from autobatch.search.storage import open_storage, redact, storage_file_exists

#: the constraint of an OOM trial when no better estimate of its demand exists
OOM_CONSTRAINT_FLOOR = 0.05
#: the user attrs a trial's telemetry adds, which the recommendation carries for the advice
TELEMETRY_ATTRS = (*ATTR_KEYS, "telemetry_samples", "telemetry_note")


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
    #: the run the recommendation is for and how far trials trained toward it:
    #: {"horizon", "top_share", "reason", "recommended_share", "warning"}; None for a study without one
    horizon: dict | None = None

    @property
    def study_name(self) -> str:
        return self.study.study_name

    @property
    def worst_case_sample_size(self) -> int | None:
        """Where the task's samples differ in size: the longest one's, which the wall was measured with."""
        size = (self.probe or {}).get("worst_case_sample_size")
        return None if size is None else int(size)

    def to_dict(self) -> dict:
        return {
            "recommended": self.recommended,
            "max_micro_batch": self.max_micro_batch,
            "worst_case_sample_size": self.worst_case_sample_size,
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
            "horizon": self.horizon,
        }


def summarize(study, storage: str) -> TuneResult:
    """Recommendation and feasible Pareto front from what the study holds now."""
    from optuna.trial import TrialState

    settings = study.user_attrs.get("autobatch", {})
    probe = study.user_attrs.get("autobatch_probe", {})
    objective = get_objective(settings.get("objective", "pareto"))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    feasible = [t for t in complete if is_feasible(t)]
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
        horizon=horizon_summary(settings, recommended),
    )


def horizon_summary(settings: dict, recommended) -> dict | None:
    """The horizon a study's recommendation is for, how far its trials could train, and a warning
    when the recommendation rests on trials that trained less of it than ``MIN_HORIZON_SHARE``."""
    if not settings.get("fidelity"):
        return None
    from autobatch.search.fidelity import MIN_HORIZON_SHARE, FidelityPlan

    plan = FidelityPlan.from_dict(settings["fidelity"])
    summary: dict[str, Any] = {
        "horizon": str(plan.horizon),
        "top_share": plan.top_share,
        "reason": plan.reason,
        "given": bool(settings.get("horizon_given")),
        "max_effective_batch": settings.get("max_effective_batch"),
        "max_effective_batch_given": bool((settings.get("search_space") or {}).get("max_effective_batch")),
    }
    if recommended is not None:
        share = recommended.user_attrs.get("horizon_share")
        summary["recommended_share"] = share
        if share is not None and share < MIN_HORIZON_SHARE:
            summary["warning"] = (
                f"the recommendation rests on trials that trained {share:.0%} of the horizon, less than the "
                f"{MIN_HORIZON_SHARE:.0%} it should: give the study more time (--study-time) or a shorter horizon"
            )
    return summary


def load_study_result(storage: str, study_name: str) -> TuneResult:
    """The summary of a stored study, as :func:`tune` returns it (for ``autobatch show``)."""
    study = load_existing_study(storage, study_name)
    if study is None:
        raise StorageError(f"study_name={study_name!r}: no such study in {redact(storage)!r}")
    if "autobatch" not in study.user_attrs:
        raise StorageError(f"study_name={study_name!r} in {redact(storage)!r} is not an autobatch study")
    return summarize(study, redact(storage))


def load_existing_study(url: str, study_name: str):
    """The stored study ``study_name``, or None when there is none (without creating anything)."""
    import optuna

    if not storage_file_exists(url):
        return None  # opening would create the file: there is nothing to load
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def trial_outcome(
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
        # what the peak counts on this device, for the dashboard (on a GPU: allocator + context)
        memory_budget_covers=result.memory_budget_covers,
        allocator_peak_bytes=result.allocator_peak_bytes,
        device_overhead_bytes=result.device_overhead_bytes,
        samples_per_second=result.samples_per_second,
        val_loss=result.val_loss,
        timings={k: round(v, 4) for k, v in result.timings.items()},
        framework=result.framework or settings["backend"],
        device=result.device or settings["device"],
    )
    attrs.update(
        telemetry_attrs(result.telemetry)
    )  # peak device memory, mean utilization (autobatch.process.telemetry)
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
    # the budget is the estimate's error (the CPU peak is estimated, see process/child.py).
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
    if settings.get("fidelity"):
        from autobatch.search.fidelity import FidelityPlan, horizon_attrs

        attrs.update(horizon_attrs(FidelityPlan.from_dict(settings["fidelity"]), config, result))
    return attrs, objective.values(throughput, float(loss), efficiency), constraint, False


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


def study_noise_scale(study) -> float | None:
    """The B_noise goodput and the adascale rule use: the noise probe's, ``math.inf`` when unbounded.

    None when the study has no noise probe (its objective and rule need none).
    """
    noise = study.user_attrs.get("autobatch_noise")
    if noise is None:
        return None
    estimate = noise.get("b_simple")
    return math.inf if estimate is None else float(estimate)


def pareto_front(trials: list) -> list:
    """Trials no other trial beats on both throughput (higher) and loss (lower)."""
    return _measured_front(trials)


def recommend(front: list, loss_tolerance: float):
    """The fastest feasible Pareto trial whose loss is within ``loss_tolerance`` of the best loss."""
    return fastest_within_tolerance(front, loss_tolerance)


def feasible_front(study) -> list:
    """The Pareto front of the study's feasible complete trials."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return pareto_front([t for t in complete if is_feasible(t)])


def is_feasible(trial) -> bool:
    """Fits the budget, trained to the end, and its loss is finite: a candidate for the front."""
    return bool(trial.user_attrs.get("feasible")) and not trial.user_attrs.get("diverged") and trial.values is not None


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
    for key in (
        "goodput",
        "statistical_efficiency",
        "noise_scale",
        "loss_at_horizon",
        "loss_at_horizon_kind",
        "horizon_share",
        "horizon_prediction",
    ):
        if key in attrs:
            described[key] = attrs[key]
    return described
