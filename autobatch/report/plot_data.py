"""What the plots of a study read from it: one :class:`TrialPoint` per trial and a :class:`StudyPlotData`.

The matplotlib figures (:mod:`autobatch.report.figures`) and the plotly ones for optuna-dashboard
(:mod:`autobatch.report.dashboard_plots`) draw the same four views from one :class:`StudyPlotData`:
the Pareto front, throughput against micro-batch (a line per accumulation setting), peak memory
against micro-batch with the budget and the probe's fitted model, and validation loss against
learning rate. The study note reads the same trial kinds through :func:`trial_points`.

Infeasible trials are stored with placeholder objective values (0 samples/s, loss 1e3) so the
sampler learns where the wall is. Plotted at those values they would squash every axis (the
dashboard's own Pareto plot does just that), so they are drawn apart, by kind, and never on
the front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autobatch.search.objectives import measured

#: the four views, in the order they are drawn and saved
VIEWS = ("pareto", "throughput", "memory", "learning_rate")
#: what each kind of infeasible trial is called in legends (the order of the side panel)
INFEASIBLE_KINDS = {
    "oom": "out of memory",
    "skipped": "skipped: predicted over budget",
    "over_budget": "over the memory budget",
    "diverged": "diverged (loss not finite)",
    "failed": "failed (error)",
}
#: the kinds' names on the side panel's axis, where there is little room
SHORT_KINDS = {"oom": "OOM", "skipped": "skipped", "over_budget": "over", "diverged": "diverged", "failed": "failed"}
INFEASIBLE_COLOR = "#d62728"
RECOMMENDED_COLOR = "#ffbf00"
FRONT_COLOR = "#1f77b4"
DOMINATED_COLOR = "#9e9e9e"
MODEL_COLOR = "#2ca02c"


@dataclass
class TrialPoint:
    """One trial as the plots see it: its config, what it measured, and what kind of outcome it was."""

    number: int
    micro_batch_size: int
    accumulation_steps: int
    effective_batch_size: int
    learning_rate: float
    kind: str  # "feasible" or a key of INFEASIBLE_KINDS
    throughput: float | None  # measured samples/s; None when the trial trained nothing
    val_loss: float | None  # only for feasible trials
    peak_memory_bytes: int | None
    predicted_peak_bytes: int | None
    on_front: bool = False


@dataclass
class StudyPlotData:
    """What the four views need from a study, read once."""

    study_name: str
    title: str
    trials: list[TrialPoint]
    recommended: int | None  # trial number
    memory_budget_bytes: int
    safety_margin: float
    max_micro_batch: int
    intercept_bytes: float | None
    bytes_per_sample: float | None
    probes: list[dict] = field(default_factory=list)

    @classmethod
    def from_study(cls, study, result=None) -> StudyPlotData:
        """Read ``study``; ``result`` (a :class:`~autobatch.search.results.TuneResult` of it) saves summarizing again."""
        from autobatch.search.results import summarize

        result = result if result is not None else summarize(study, "")
        settings = study.user_attrs.get("autobatch", {})
        probe = result.probe or {}
        model = probe.get("memory_model") or {}
        trials = trial_points(study, front={p["trial_number"] for p in result.pareto_front})
        return cls(
            study_name=study.study_name,
            title=f"{settings.get('task', study.study_name)} on {settings.get('backend', '?')} ({settings.get('device', '?')})",
            trials=trials,
            recommended=result.recommended["trial_number"] if result.recommended else None,
            memory_budget_bytes=result.memory_budget_bytes,
            safety_margin=float(settings.get("safety_margin", probe.get("safety_margin", 0.0))),
            max_micro_batch=result.max_micro_batch,
            intercept_bytes=model.get("intercept_bytes"),
            bytes_per_sample=model.get("bytes_per_sample"),
            probes=list(probe.get("probes", [])),
        )

    @property
    def feasible(self) -> list[TrialPoint]:
        return [t for t in self.trials if t.kind == "feasible"]

    @property
    def infeasible(self) -> list[TrialPoint]:
        return [t for t in self.trials if t.kind != "feasible"]

    @property
    def front(self) -> list[TrialPoint]:
        """The feasible Pareto front, by throughput (a feasible trial always measured one)."""
        return sorted((t for t in self.feasible if t.on_front), key=lambda t: t.throughput or 0.0)

    @property
    def dominated(self) -> list[TrialPoint]:
        """Feasible trials off the front."""
        return [t for t in self.feasible if not t.on_front]

    @property
    def infeasible_by_kind(self) -> dict[str, list[TrialPoint]]:
        """The infeasible trials of each kind the study has, in the order of :data:`INFEASIBLE_KINDS`."""
        by_kind = {kind: [t for t in self.trials if t.kind == kind] for kind in INFEASIBLE_KINDS}
        return {kind: trials for kind, trials in by_kind.items() if trials}

    @property
    def measured(self) -> list[TrialPoint]:
        """Trials that trained and timed their steps (a diverged one too: its throughput is real)."""
        return [t for t in self.trials if t.throughput and t.kind in ("feasible", "diverged")]

    @property
    def stopped(self) -> list[TrialPoint]:
        """Trials the memory wall stopped: out of memory, over the budget, or skipped by the model."""
        return [t for t in self.infeasible if t.kind in ("oom", "skipped", "over_budget")]

    @property
    def micro_batch_axis_end(self) -> float:
        """The right end of a linear micro-batch axis: every trial, probe and the memory wall, with room."""
        micro_batches = [t.micro_batch_size for t in self.trials] + [p["micro_batch"] for p in self.probes]
        micro_batches.append(self.max_micro_batch)
        return max(micro_batches) * 1.15 if any(micro_batches) else 1

    @property
    def recommended_trial(self) -> TrialPoint | None:
        return next((t for t in self.trials if t.number == self.recommended), None)

    def predicted_peaks(self, micro_batches: list[float]) -> list[float] | None:
        """The probe's fitted memory model at each micro-batch, in bytes; None when the probe fitted none."""
        if self.intercept_bytes is None or self.bytes_per_sample is None:
            return None
        return [self.intercept_bytes + self.bytes_per_sample * micro_batch for micro_batch in micro_batches]


def trial_points(study, front: set[int] | frozenset[int] = frozenset()) -> list[TrialPoint]:
    """Every finished trial of ``study`` that drew a config; ``front`` holds the Pareto trials' numbers."""
    points = (_trial_point(trial, front) for trial in study.get_trials(deepcopy=False))
    return [point for point in points if point is not None]


def trial_kind(trial) -> str:
    """ "feasible", or which kind of infeasible (the same test as the study's own recommendation)."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.FAIL:
        return "failed"
    if attrs.get("skipped_by_model"):
        return "skipped"
    if attrs.get("oom"):
        return "oom"
    if not attrs.get("feasible"):
        return "over_budget"
    if attrs.get("diverged") or trial.values is None:
        return "diverged"
    return "feasible"


def spread(count: int, width: float = 0.5) -> list[float]:
    """Horizontal offsets that keep ``count`` markers in one column apart."""
    if count <= 1:
        return [0.0] * count
    return [-width / 2 + width * i / (count - 1) for i in range(count)]


def _trial_point(trial, front) -> TrialPoint | None:
    """``trial`` as a plot point; None for a trial that never drew its config (or still runs)."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state not in (TrialState.COMPLETE, TrialState.FAIL) or "micro_batch_size" not in attrs:
        return None
    kind = trial_kind(trial)
    feasible = kind == "feasible"
    # Whatever the study's objective, the views plot what the trial measured.
    throughput, val_loss = measured(trial) if feasible else (attrs.get("samples_per_second"), None)
    return TrialPoint(
        number=trial.number,
        micro_batch_size=int(attrs["micro_batch_size"]),
        accumulation_steps=int(attrs.get("accumulation_steps", 1)),
        effective_batch_size=int(attrs.get("effective_batch_size", attrs["micro_batch_size"])),
        learning_rate=float(attrs.get("learning_rate", math.nan)),
        kind=kind,
        throughput=float(throughput) if throughput is not None else None,
        val_loss=val_loss,
        peak_memory_bytes=attrs.get("peak_memory_bytes"),
        predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
        on_front=feasible and trial.number in front,
    )
