"""How far each search trial trains toward the horizon, and where it is evaluated on the way.

The recommendation is for the run the user will make (:mod:`autobatch.search.horizon`), so
trials train toward that run's length. Training every config that far costs as much as a
grid; successive halving (Jamieson & Talwalkar, AISTATS 2016; asynchronously as ASHA, Li et
al., MLSys 2020; Optuna's ``SuccessiveHalvingPruner``) spends it where it pays: every trial
is evaluated at 1/27, 1/9, 1/3 and all of its length, and one that trails the best third of
the trials that reached a rung stops there. The longest trials train the whole horizon when
the study's time allows (``tune(timeout=...)``, ``--study-time``); otherwise the share of it
that does, and the loss at the horizon is predicted from each survivor's learning curve
(:mod:`autobatch.search.curves`).

Every objective reads the horizon: ``horizon`` (the default) searches with rungs as above;
``pareto`` and ``goodput`` train each trial the same top share once; ``time-to-target``
keeps its own time per trial.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.search.curves import predict_loss
from autobatch.search.horizon import Horizon
from autobatch.search.objectives import REDUCTION_FACTOR

#: rungs per trial: 1/27, 1/9, 1/3 and all of the trial's length
RUNGS = 4
#: a rung shorter than this many optimizer steps is skipped: a loss after one step says little
MIN_RUNG_WINDOWS = 2
#: planning: the share of the top length an average trial trains under asynchronous halving
#: (about 0.11 once many trials compete at each rung; more early on, when few have)
MEAN_TRAINED_SHARE = 0.25
#: trials planned for when the study is bounded by time alone
PLANNED_TRIALS = 20
#: a recommendation from trials that trained less of the horizon than this says so
MIN_HORIZON_SHARE = 0.25
#: no config is searched whose run would take fewer optimizer steps than this over the horizon
MIN_RUN_STEPS = 16


def largest_effective_batch(horizon: Horizon, n_train: int) -> int | None:
    """The largest effective batch the search tries: the horizon's samples in :data:`MIN_RUN_STEPS` optimizer steps.

    A config that trains its run in a handful of steps is not a training run: a 1-epoch
    horizon of 2,048 samples at an effective batch of 2,048 takes one step, and its loss is
    the initial one. Searching such configs costs the most of all (the memory probe confirms
    the wall at the largest accumulation, windows of up to 8 × the wall), for configs that
    cannot win. ``None`` where the horizon leaves every config its steps (a horizon in optimizer
    steps) or its samples wait on the throughput (wall time).
    """
    if horizon.unit == "steps" or horizon.is_time:
        return None
    samples = horizon.samples(n_train, 1)
    assert samples is not None
    return max(1, math.floor(samples / MIN_RUN_STEPS))


def rung_fractions() -> tuple[float, ...]:
    """The shares of a trial's length where it is evaluated: 1/27, 1/9, 1/3, 1."""
    return tuple(REDUCTION_FACTOR ** -(RUNGS - 1 - k) for k in range(RUNGS))


@dataclass(frozen=True)
class FidelityPlan:
    """How far the study's trials train: ``top_share`` of the horizon at most.

    ``max_trial_samples`` caps a trial's samples whatever the horizon (the user's own cap);
    ``multi_fidelity`` evaluates at every rung and lets the pruner stop trials (the horizon
    objective); without it a trial trains its whole length and evaluates once.
    """

    horizon: Horizon
    top_share: float
    n_train: int
    multi_fidelity: bool
    max_trial_samples: int | None = None
    reason: str = ""

    def horizon_samples(self, config: TrialConfig, samples_per_second: float | None = None) -> float | None:
        """The samples ``config`` trains in the user's run; for a wall-time horizon, at ``samples_per_second``."""
        return self.horizon.samples(self.n_train, config.effective_batch_size, samples_per_second)

    def budget_for(self, config: TrialConfig, base: TrialBudget) -> TrialBudget:
        """``base`` with the length and the evaluations of a search trial of ``config``."""
        fractions = rung_fractions() if self.multi_fidelity else (1.0,)
        if self.horizon.is_time:
            # Trained for a share of the wall time: a faster config trains more samples in it.
            return dataclasses.replace(
                base,
                train_seconds=self.top_share * self.horizon.amount,
                evaluations=len(fractions),
                evaluation_fractions=fractions,
            )
        samples = self.horizon_samples(config)
        assert samples is not None
        length = max(config.effective_batch_size, math.ceil(self.top_share * samples))
        if self.max_trial_samples is not None:
            length = min(length, max(config.effective_batch_size, self.max_trial_samples))
        shortest = MIN_RUNG_WINDOWS * config.effective_batch_size
        kept = tuple(f for f in fractions if f == 1.0 or f * length >= shortest)
        return dataclasses.replace(base, train_samples=length, train_seconds=None, evaluation_fractions=kept)

    def share_reached(self, config: TrialConfig, samples_trained: int, train_seconds: float) -> float:
        """The share of the horizon a trial of ``config`` trained, at most all of it.

        A trial takes at least one optimizer step, which may hold more samples than a short
        horizon: it then trained the whole horizon (and the few steps the run would take).
        """
        if self.horizon.is_time:
            return min(1.0, train_seconds / self.horizon.amount)
        samples = self.horizon_samples(config)
        return min(1.0, samples_trained / samples) if samples else 0.0

    @property
    def first_step(self) -> int:
        """The pruner's first rung, in the thousandths of a trial's length that trials report."""
        return math.floor(1000 * rung_fractions()[0])

    def to_dict(self) -> dict:
        return {
            "horizon": self.horizon.to_dict(),
            "top_share": self.top_share,
            "n_train": self.n_train,
            "multi_fidelity": self.multi_fidelity,
            "max_trial_samples": self.max_trial_samples,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FidelityPlan:
        return cls(
            horizon=Horizon.from_dict(data["horizon"]),
            top_share=float(data["top_share"]),
            n_train=int(data["n_train"]),
            multi_fidelity=bool(data["multi_fidelity"]),
            max_trial_samples=data.get("max_trial_samples"),
            reason=str(data.get("reason", "")),
        )


def plan_fidelity(
    horizon: Horizon,
    *,
    n_train: int,
    base_batch_size: int,
    probes: list[dict],
    n_trials: int | None,
    study_seconds: float | None,
    max_trial_samples: int | None,
    multi_fidelity: bool,
) -> FidelityPlan:
    """The longest a search trial trains: all of the horizon, unless the study's time or the user's cap says less.

    The cost of a trial comes from the memory probes that ran to the end (their samples/s and
    the seconds a trial spends outside training: starting, building, evaluating); the
    horizon's samples are counted at the task's base batch (for a horizon in optimizer steps).
    """
    plan = FidelityPlan(horizon, 1.0, n_train, multi_fidelity, max_trial_samples, "the whole horizon")
    ran = [p for p in probes if p.get("status") == "ok" and p.get("samples_per_second")]
    speed = statistics.median(p["samples_per_second"] for p in ran) if ran else None
    overhead = _overhead_seconds(ran)
    base = TrialConfig(max(1, base_batch_size))
    samples = horizon.samples(n_train, base.effective_batch_size, speed)
    if max_trial_samples is not None and samples:
        share = max_trial_samples / samples
        if share < plan.top_share:
            plan = dataclasses.replace(
                plan,
                top_share=share,
                reason=f"at most {max_trial_samples} samples a trial: --samples, max_trial_samples",
            )
    if study_seconds is None or speed is None or not samples:
        return plan
    trials = n_trials or PLANNED_TRIALS
    training_seconds = study_seconds - trials * overhead
    trained_share = MEAN_TRAINED_SHARE if multi_fidelity else 1.0
    share = max(0.0, training_seconds) * speed / (trials * samples * trained_share)
    if share < plan.top_share:
        floor = base.effective_batch_size * MIN_RUNG_WINDOWS / samples  # at least a couple of steps
        plan = dataclasses.replace(
            plan,
            top_share=max(share, floor),
            reason=f"{trials} trials in the {study_seconds:.0f} s left of the study's time, at ~{speed:.0f} samples/s",
        )
    return plan


def horizon_attrs(plan: FidelityPlan, config: TrialConfig, result: TrialResult) -> dict:
    """What a trial that ran says of the horizon, as user attrs: how far it trained, and its loss there.

    Measured where the trial reached the horizon; else predicted from the losses it measured
    on the way, with the prediction's spread; else (a curve that cannot be fitted honestly:
    too few points, rising at its end) the last loss measured, and the attrs say which.
    """
    if result.val_loss is None or not math.isfinite(result.val_loss):
        return {}
    train_seconds = result.timings.get("train", 0.0)
    share = plan.share_reached(config, result.samples_trained, train_seconds)
    target = plan.horizon_samples(config, result.samples_per_second)
    attrs: dict = {"horizon_share": share, "horizon_samples": target}
    if share >= 0.999 or not target:
        return {**attrs, "loss_at_horizon": result.val_loss, "loss_at_horizon_kind": "measured"}
    if result.extras.get("lr_schedule") not in (None, "constant"):
        # Under a decaying rate the losses on the way are measured mid-schedule: not a power law in
        # samples. Each trial ran its whole schedule over its own length, so its last loss compares fairly.
        return {**attrs, "loss_at_horizon": result.val_loss, "loss_at_horizon_kind": "last measured (decaying rate)"}
    points = [(e["samples"], e["val_loss"]) for e in result.intermediate_losses if "samples" in e]
    if not points:
        points = [(result.samples_trained, result.val_loss)]
    prediction = predict_loss([n for n, _ in points], [loss for _, loss in points], target)
    if prediction is None:
        return {**attrs, "loss_at_horizon": result.val_loss, "loss_at_horizon_kind": "last measured (no curve fit)"}
    return {
        **attrs,
        "loss_at_horizon": prediction.loss,
        "loss_at_horizon_kind": "predicted",
        "horizon_prediction": prediction.to_dict(),
    }


def _overhead_seconds(ran: list[dict]) -> float:
    """What a trial costs besides training, from the probes: their wall time less their training time."""
    spent = [
        p["seconds"] - p["samples_trained"] / p["samples_per_second"]
        for p in ran
        if p.get("seconds") and p.get("samples_trained")
    ]
    return max(0.0, statistics.median(spent)) if spent else 0.0
