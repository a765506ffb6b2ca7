"""The search loop: ask → run the trial in a worker → record → tell, until the trials are done.

Every trial's outcome is stored as user attrs, values and a memory constraint
(:func:`autobatch.search.results.trial_outcome`), and the study note is rewritten after it.
Late in a pareto study, every other trial is a small step from the current
recommendation (:func:`refinement_steps`), which a multi-objective sampler would
otherwise rarely try.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.core.noise import statistical_efficiency
from autobatch.errors import AutobatchError
from autobatch.search import coordination
from autobatch.search.fidelity import FidelityPlan
from autobatch.search.note import write_note
from autobatch.search.objectives import get_objective
from autobatch.search.probe import ProbeResult
from autobatch.search.results import (
    TrialRecord,
    feasible_front,
    recommend,
    study_noise_scale,
    summarize,
    trial_outcome,
)
from autobatch.search.space import SearchSpace

#: stop the study when the first trials all fail: the task is broken, not the configs
FAILURES_BEFORE_GIVING_UP = 3
#: the last share of the trials in which every other trial refines the recommendation
REFINE_SHARE = 0.35


class SearchRunner:
    """The ask → run in a worker → record → tell loop.

    ``on_trial`` hears of every trial this process finishes (and, through
    :meth:`record_for`, of the trials of other processes).
    """

    def __init__(
        self,
        study,
        space: SearchSpace,
        probe: ProbeResult,
        settings: dict,
        on_trial: Callable[[TrialRecord], None] | None,
    ):
        self.study = study
        self.space = space
        self.probe = probe
        self.settings = settings
        self.on_trial = on_trial
        self.failures_in_a_row = 0
        self.refinements = 0
        self.objective = get_objective(settings["objective"])
        self.noise_scale = study_noise_scale(study)
        self.trial_budget = TrialBudget.from_dict(settings["trial_budget"])
        stored_plan = settings.get("fidelity")
        self.fidelity = None if stored_plan is None else FidelityPlan.from_dict(stored_plan)

    def optimize(
        self,
        run: Callable[..., TrialResult],
        n_trials: int | None,
        timeout: float | None,
        study_trials: int | None = None,
    ) -> None:
        """Run ``n_trials`` here, or until ``timeout``, or until the study holds ``study_trials`` complete trials.

        ``run(config, budget, on_report)`` runs one trial in a worker and returns its result.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        done = 0
        while (n_trials is None or done < n_trials) and (timeout is None or time.monotonic() - started < timeout):
            elapsed_share = max(
                done / n_trials if n_trials else 0.0,
                (time.monotonic() - started) / timeout if timeout else 0.0,
                coordination.complete_trial_count(self.study) / study_trials if study_trials else 0.0,
            )
            # Refinement serves the pareto recommendation; a single objective's sampler homes in by itself.
            late = elapsed_share >= 1 - REFINE_SHARE and done % 2 == 1 and self.objective.name == "pareto"
            refine = self._enqueue_refinement if late else None
            # Under a study-wide goal the workers ask one at a time: together they run exactly that many.
            trial = coordination.claim_trial(self.study, study_trials, deadline, before_ask=refine)
            if trial is None:
                break  # the study holds study_trials complete trials
            with coordination.settled_on_interrupt(self.study, trial):
                self._one_trial(trial, run)
            done += 1

    def _enqueue_refinement(self) -> None:
        """Queue a small step from the current recommendation.

        A multi-objective sampler spreads its trials along the whole Pareto front, but
        the recommendation sits at one end of it (fastest within the loss tolerance).
        Late in the study every other trial steps from there: a larger micro-batch, the
        same effective batch with less accumulation, or a nudged learning rate.
        """
        incumbent = recommend(feasible_front(self.study), self.settings["loss_tolerance"])
        if incumbent is None:
            return
        params = dict(incumbent.params)
        steps = refinement_steps(
            params, self.space, self.probe.max_micro_batch, self.settings.get("max_effective_batch")
        )
        if not steps:
            return
        self.study.enqueue_trial(steps[self.refinements % len(steps)], skip_if_exists=True)
        self.refinements += 1

    def _one_trial(self, trial, run: Callable[..., TrialResult]) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            with coordination.trial_heartbeat(self.study, trial._trial_id):
                trial.set_user_attr("worker", coordination.worker_label())
                config = self._suggest(trial)
                budget_bytes = self.settings["memory_budget_bytes"]
                predicted = self.probe.memory_model.predict(config.micro_batch_size)
                # Up to the wall, the probe ran it under the margin-reduced cap: it fits. Past
                # the wall, the fitted model decides whether it is worth a run.
                skipped = config.micro_batch_size > self.probe.max_micro_batch and predicted > budget_bytes * (
                    1 - self.settings["safety_margin"]
                )
                result = None if skipped else run(config, self.budget_for(config), self._reporter(trial))
        except KeyboardInterrupt:
            # The worker has killed the trial's process; FAIL it and queue it for a resumed study.
            reason = f"interrupted (Ctrl-C) in worker {coordination.worker_label()}"
            coordination.fail_interrupted_trial(self.study, trial, reason)
            raise
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)  # never leave it RUNNING
            raise
        efficiency = statistical_efficiency(
            self.noise_scale, config.effective_batch_size, self.settings["base_batch_size"]
        )
        attrs, values, constraint, failed = trial_outcome(
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
        with coordination.study_lock(self.study):  # workers take turns: a note is several storage rows
            write_note(self.study, summarize(self.study, ""), during_search=True)

    def budget_for(self, config: TrialConfig) -> TrialBudget:
        """How far a trial of ``config`` trains and where it is evaluated: toward the study's horizon."""
        if self.fidelity is None:
            return self.trial_budget
        return self.fidelity.budget_for(config, self.trial_budget)

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
            max_effective_batch=self.settings.get("max_effective_batch"),
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


def refinement_steps(params: dict, space: SearchSpace, wall: int, max_effective_batch: int | None = None) -> list[dict]:
    """Neighbours of an incumbent's params, in the order they are tried; none past ``max_effective_batch``."""
    steps = []
    accumulation = params["accumulation_steps"]
    # the largest micro-batch at this accumulation: the wall, and the effective batch's bound
    most = wall if max_effective_batch is None else min(wall, max_effective_batch // accumulation)
    if "micro_batch_log2" in params:
        if 2 ** (params["micro_batch_log2"] + 1) <= most:
            steps.append({**params, "micro_batch_log2": params["micro_batch_log2"] + 1})
    else:
        micro = params["micro_batch_size"]
        larger = min(most, max(micro + 1, round(micro * 1.2)))
        if larger > micro:
            steps.append({**params, "micro_batch_size": larger})
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
