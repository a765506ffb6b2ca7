"""What a study optimizes: ``objective="horizon"``, ``"pareto"``, ``"goodput"`` or ``"time-to-target"``.

- ``horizon`` (the default): the validation loss at the end of the run the user will make
  (:mod:`autobatch.search.horizon`), down. Trials train toward that horizon and are
  evaluated on the way, and a successive-halving pruner stops those that trail
  (:mod:`autobatch.search.fidelity`). Recommended: the feasible trial, among those that
  trained furthest, with the lowest loss at the horizon (measured where trials reached it,
  else predicted from its learning curve: :mod:`autobatch.search.curves`); losses within
  the loss tolerance of the best count as a tie, which the faster config wins.
- ``pareto``: two objectives, throughput up and the validation loss after a
  fixed number of samples down. Recommended: the fastest feasible Pareto trial whose loss
  is within the loss tolerance of the best. Throughput alone would reward the largest
  batch; loss after fixed samples penalises it; the front shows the trade.
- ``goodput``: one objective, throughput × statistical efficiency, efficiency =
  (B_noise + B_0)/(B_noise + B) for effective batch B against the task's base batch B_0
  (Pollux, OSDI 2021), with B_noise the gradient noise scale measured once when the study
  starts (so every trial is ranked by the same number). Goodput ranks batch sizes given
  a learning rate that keeps up with them, so the learning rate follows its rule
  (``adascale`` by default) and is not searched.
- ``time-to-target``: one objective, the validation loss reached within a fixed training
  time per trial (``TrialBudget.train_seconds``). The loss is measured at evenly spaced
  points; Optuna's successive-halving or Hyperband pruner stops trials that trail at them.

Every objective keeps the memory constraint, the user attrs and the throughput/loss
Pareto front of the note; they differ in the values Optuna is told and in the
recommendation.
"""

from __future__ import annotations

import math
from typing import Literal

from autobatch._validation import StrOptions, check_param

OBJECTIVES = ("horizon", "pareto", "goodput", "time-to-target")
DEFAULT_OBJECTIVE = "horizon"
PRUNERS = ("successive-halving", "hyperband", "none")
#: the validation loss recorded for trials that did not produce one (OOM, skipped, diverged)
PLACEHOLDER_LOSS = 1e3
#: a pruner keeps the best 1/3 of the trials at each rung (Optuna's Hyperband default)
REDUCTION_FACTOR = 3


class Objective:
    """How one objective turns a trial's measurements into Optuna values, and picks a trial."""

    name = ""
    directions: tuple[Literal["minimize", "maximize"], ...] = ()
    metric_names: tuple[str, ...] = ()
    #: whether intermediate losses are reported to a pruner
    prunes = False
    #: whether the learning rate is the rule's, without a searched offset
    pins_learning_rate = False

    def values(self, throughput: float, val_loss: float, efficiency: float) -> tuple[float, ...]:
        """Optuna's values for a feasible trial that trained to the end."""
        raise NotImplementedError

    def placeholder(self) -> tuple[float, ...]:
        """Values for a trial that produced no measurement (OOM, skipped, diverged): the worst plausible."""
        raise NotImplementedError

    def recommend(self, feasible: list, loss_tolerance: float):
        """The trial to recommend among feasible, complete, non-diverged trials (None if none)."""
        raise NotImplementedError

    def rule_text(self, loss_tolerance: float) -> str:
        """How the recommendation was chosen, for the study note."""
        raise NotImplementedError


class ParetoObjective(Objective):
    name = "pareto"
    directions = ("maximize", "minimize")
    metric_names = ("throughput (samples/s)", "validation loss")

    def values(self, throughput, val_loss, efficiency):
        return (throughput, val_loss)

    def placeholder(self):
        return (0.0, PLACEHOLDER_LOSS)

    def recommend(self, feasible, loss_tolerance):
        return fastest_within_tolerance(pareto_front(feasible), loss_tolerance)

    def rule_text(self, loss_tolerance):
        return (
            f"Rule: the fastest feasible Pareto-optimal trial whose validation loss is within "
            f"{loss_tolerance:.0%} of the best feasible loss."
        )


class GoodputObjective(Objective):
    name = "goodput"
    directions = ("maximize",)
    metric_names = ("goodput (base-batch samples/s)",)
    pins_learning_rate = True

    def values(self, throughput, val_loss, efficiency):
        return (throughput * efficiency,)

    def placeholder(self):
        return (0.0,)

    def recommend(self, feasible, loss_tolerance):
        return max(feasible, key=lambda t: t.values[0], default=None)

    def rule_text(self, loss_tolerance):
        return (
            "Rule: the feasible trial with the highest goodput, throughput × statistical efficiency "
            "(B_noise + B_0)/(B_noise + B): samples/s counted at what they are worth at the base batch."
        )


class _PrunedLossObjective(Objective):
    """One objective, the validation loss at a trial's end, with intermediate losses for a pruner."""

    directions = ("minimize",)
    prunes = True

    def values(self, throughput, val_loss, efficiency):
        return (val_loss,)

    def placeholder(self):
        return (PLACEHOLDER_LOSS,)


class TimeToTargetObjective(_PrunedLossObjective):
    name = "time-to-target"
    metric_names = ("validation loss within the time budget",)

    def recommend(self, feasible, loss_tolerance):
        return min(feasible, key=lambda t: t.values[0], default=None)

    def rule_text(self, loss_tolerance):
        return (
            "Rule: the feasible trial that trained to the end of its time budget with the lowest "
            "validation loss (pruned trials are not candidates)."
        )


class HorizonObjective(_PrunedLossObjective):
    name = "horizon"
    metric_names = ("validation loss at the trial's full length",)

    def recommend(self, feasible, loss_tolerance):
        # Only the trials that trained furthest compete: a shorter one was stopped for trailing at a rung.
        ranked = [t for t in feasible if t.user_attrs.get("loss_at_horizon") is not None]
        if not ranked:
            return None
        furthest = max(t.user_attrs.get("horizon_share", 0.0) for t in ranked)
        ranked = [t for t in ranked if t.user_attrs.get("horizon_share", 0.0) >= 0.9 * furthest]
        best = min(t.user_attrs["loss_at_horizon"] for t in ranked)
        allowed = best + loss_tolerance * abs(best)
        tied = [t for t in ranked if t.user_attrs["loss_at_horizon"] <= allowed]
        return max(tied, key=lambda t: measured(t)[0])

    def rule_text(self, loss_tolerance):
        return (
            "Rule: among the feasible trials that trained furthest toward the horizon, the lowest validation loss "
            f"at the horizon (measured, or predicted from the trial's learning curve); losses within "
            f"{loss_tolerance:.0%} of the best count as a tie, which the faster config wins."
        )


_BY_NAME = {
    objective.name: objective
    for objective in (HorizonObjective(), ParetoObjective(), GoodputObjective(), TimeToTargetObjective())
}


def get_objective(name: str) -> Objective:
    """The objective named ``name``, or an error naming what is allowed."""
    check_param("objective", name, StrOptions(OBJECTIVES))
    return _BY_NAME[name]


def check_pruner(name: str) -> str:
    check_param("pruner", name, StrOptions(PRUNERS))
    return name


def make_pruner(name: str, evaluations: int, first_step: int = 1):
    """Optuna's pruner for a study whose trials report ``evaluations`` steps, the first at ``first_step``.

    A time-to-target trial reports its evaluations' numbers 1..evaluations; a horizon trial
    reports the thousandths of its length trained, the first rung at ``first_step``. Either
    way each next rung is ``REDUCTION_FACTOR`` times later. Pruners keep no state of their
    own (rungs are trial system attrs in the storage), so every worker makes its own.
    """
    import optuna

    check_pruner(name)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        last = 1000 if first_step > 1 else max(evaluations, 1)
        return optuna.pruners.HyperbandPruner(
            min_resource=first_step, max_resource=last, reduction_factor=REDUCTION_FACTOR
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=first_step, reduction_factor=REDUCTION_FACTOR, min_early_stopping_rate=0
    )


def measured(trial) -> tuple[float, float]:
    """(throughput, validation loss) a trial measured, whatever its objective's values are.

    Toward a horizon the loss is the one at the horizon (measured there, or predicted), so the
    front shows the trade the recommendation is about: throughput against the run's final loss.
    """
    if trial.values is not None and len(trial.values) == 2:
        return float(trial.values[0]), float(trial.values[1])  # the pareto objective's values are just that
    attrs = trial.user_attrs
    loss = attrs.get("loss_at_horizon", attrs.get("val_loss"))
    return float(attrs.get("samples_per_second") or 0.0), float(loss) if loss is not None else math.nan


def pareto_front(trials: list) -> list:
    """Trials no other trial beats on both throughput (higher) and loss (lower)."""
    points = {t.number: measured(t) for t in trials}
    front = []
    for candidate in trials:
        speed, loss = points[candidate.number]
        dominated = any(
            other_speed >= speed and other_loss <= loss and (other_speed, other_loss) != (speed, loss)
            for other_speed, other_loss in points.values()
        )
        if not dominated:
            front.append(candidate)
    return front


def fastest_within_tolerance(front: list, loss_tolerance: float):
    """The fastest trial whose loss is within ``loss_tolerance`` of the best loss in ``front``."""
    if not front:
        return None
    best_loss = min(measured(t)[1] for t in front)
    allowed = best_loss + loss_tolerance * abs(best_loss)
    return max((t for t in front if measured(t)[1] <= allowed), key=lambda t: measured(t)[0])
