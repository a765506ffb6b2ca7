"""The horizon drives the search: trials continued toward the user's run, and the loss there ranks them.

The studies run the closed-form learning curves of ``tests/efficiency_tasks.py`` through the real
worker, study and pruner (no time passes in a trial), so the truth at the horizon is a formula.
"""

from __future__ import annotations

import math

import pytest

from autobatch import tune
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.schedule import ReportingProgress, TrialSchedule, run_schedule
from autobatch.core.windows import SteadyStateTimer
from autobatch.errors import InvalidParameterError
from autobatch.search.fidelity import (
    MIN_HORIZON_SHARE,
    MIN_RUN_STEPS,
    FidelityPlan,
    largest_effective_batch,
    plan_fidelity,
    rung_fractions,
)
from autobatch.search.horizon import Horizon
from tests import efficiency_tasks as tasks

CURVES = dict(task="tests.efficiency_tasks:curve_workload", backend="tests.efficiency_tasks:CurveBackend")
N_TRAIN = 16384  # the curve workload's training split


def test_a_trial_toward_the_horizon_evaluates_at_each_rung_and_reports_thousandths():
    budget = TrialBudget(train_samples=2700, evaluation_fractions=rung_fractions(), warmup_steps=0)
    reports, losses = [], iter([0.9, 0.8, 0.7, 0.6])

    def feed(chunks):
        for windows in chunks:
            yield from ((window, None) for window in windows)

    outcome = run_schedule(
        TrialSchedule(N_TRAIN, 10, 2, budget),
        feed=feed,
        train=lambda window, batches, measure: 1.0,
        evaluate=lambda: next(losses),
        progress=ReportingProgress(lambda step, loss, seconds: reports.append((step, loss)) or False),
        timer=SteadyStateTimer(0),
    )
    assert reports == [(37, 0.9), (111, 0.8), (333, 0.7)]  # the last evaluation is the value, not a report
    # Each evaluation follows the window that reaches its share: 100, 300 and 900 samples of 2700.
    assert [entry["samples"] for entry in outcome.intermediate_losses] == [100, 300, 900, 2700]
    assert outcome.val_loss == 0.6 and outcome.samples_trained == 2700


def test_trial_lengths_follow_the_horizon_in_each_unit():
    plan = FidelityPlan(Horizon.parse("2ep"), 1.0, N_TRAIN, multi_fidelity=True)
    small, large = TrialConfig(8, 2), TrialConfig(1024, 4)
    assert plan.budget_for(small, TrialBudget()).train_samples == 2 * N_TRAIN
    assert plan.budget_for(small, TrialBudget()).evaluation_fractions == rung_fractions()
    # A rung shorter than two optimizer steps says little: 1/27 and 1/9 of 32768 samples are under 2 x 4096.
    assert plan.budget_for(large, TrialBudget()).evaluation_fractions == rung_fractions()[2:]
    steps = FidelityPlan(Horizon.parse("100 steps"), 0.5, N_TRAIN, multi_fidelity=False)
    assert steps.budget_for(small, TrialBudget()).train_samples == 50 * 16  # half of 100 steps of 16 samples
    assert steps.budget_for(small, TrialBudget()).evaluation_fractions == (1.0,)
    timed = FidelityPlan(Horizon.parse("10min"), 0.25, N_TRAIN, multi_fidelity=True)
    assert timed.budget_for(small, TrialBudget()).train_seconds == 150
    capped = FidelityPlan(Horizon.parse("2ep"), 1.0, N_TRAIN, multi_fidelity=True, max_trial_samples=1000)
    assert capped.budget_for(small, TrialBudget()).train_samples == 1000


def test_the_study_time_sets_how_far_trials_train():
    probes = [{"status": "ok", "samples_per_second": 1000.0, "samples_trained": 1000, "seconds": 2.0}]

    def share(study_seconds, trials=10, cap=None):
        return plan_fidelity(
            Horizon.parse("10ep"),
            n_train=1000,
            base_batch_size=32,
            probes=probes,
            n_trials=trials,
            study_seconds=study_seconds,
            max_trial_samples=cap,
            multi_fidelity=True,
        ).top_share

    assert share(None) == 1.0  # no time limit: the whole horizon
    # 10 trials cost 10 s besides training (1 s each, from the probe); a trial trains a quarter of its length on average.
    assert share(35.0) == pytest.approx(25 * 1000 / (10 * 10_000 * 0.25))
    assert share(35.0, trials=20) < share(35.0)
    assert share(1e6) == 1.0
    assert share(None, cap=2500) == 0.25


def test_the_horizon_bounds_the_effective_batch_to_a_run_of_several_steps():
    assert MIN_RUN_STEPS == 16
    assert largest_effective_batch(Horizon.parse("1ep"), n_train=2048) == 128
    assert largest_effective_batch(Horizon.parse("20 epochs"), n_train=1437) == 1796
    assert largest_effective_batch(Horizon.parse("100 samples"), n_train=2048) == 6
    assert (
        largest_effective_batch(Horizon.parse("8 samples"), n_train=2048) == 1
    )  # fewer samples than steps: one at a time
    # Every config takes a horizon's steps; a wall-time horizon's samples wait on the throughput.
    assert largest_effective_batch(Horizon.parse("10 steps"), n_train=2048) is None
    assert largest_effective_batch(Horizon.parse("2h"), n_train=2048) is None


def test_a_refinement_step_stays_within_the_effective_batch_searched():
    from autobatch import SearchSpace
    from autobatch.search.runner import refinement_steps

    params = {"micro_batch_size": 100, "accumulation_steps": 2, "lr_offset_decades": 0.0}
    assert refinement_steps(params, SearchSpace(), wall=500)[0]["micro_batch_size"] == 120
    assert refinement_steps(params, SearchSpace(), wall=500, max_effective_batch=220)[0]["micro_batch_size"] == 110
    at_the_bound = refinement_steps(params, SearchSpace(), wall=500, max_effective_batch=200)
    assert all(step["micro_batch_size"] * step["accumulation_steps"] <= 200 for step in at_the_bound)


@pytest.mark.slow
def test_a_short_horizon_bounds_the_probe_and_every_trial_to_a_run_of_several_steps(tmp_path):
    # 4,096 samples in at least 16 steps: effective batches up to 256; at 512 MiB the wall lies past it.
    largest = 4096 // MIN_RUN_STEPS
    result = tune(
        **CURVES, horizon="4096 samples", memory_budget="512MiB", n_trials=12, storage=f"sqlite:///{tmp_path}/h.db"
    )
    probes = result.probe["probes"]
    assert result.max_micro_batch == largest and max(p["micro_batch"] for p in probes) == largest
    # The confirmation runs at two steps, the most the search accumulates near the wall: no short probes place it.
    assert [(p["phase"], p["accumulation_steps"]) for p in probes if p["phase"] != "one step"] == [("confirmation", 2)]
    ran = [t.user_attrs for t in result.study.trials if "effective_batch_size" in t.user_attrs]
    assert len(ran) == 12 and all(attrs["effective_batch_size"] <= largest for attrs in ran)
    assert any(attrs["accumulation_steps"] > 1 for attrs in ran)
    assert result.horizon["max_effective_batch"] == largest
    from optuna_dashboard import get_note

    assert f"Effective batches were searched up to {largest}, so that the run takes at least 16" in get_note(
        result.study
    )


@pytest.mark.slow
def test_a_study_that_reaches_the_horizon_recommends_the_lowest_loss_there(tmp_path):
    result = tune(**CURVES, horizon="2ep", memory_budget="256MiB", n_trials=14, storage=f"sqlite:///{tmp_path}/h.db")
    study = result.study
    assert type(study.pruner).__name__ == "SuccessiveHalvingPruner" and study.pruner._min_resource == 37
    assert result.objective == "horizon" and result.horizon["top_share"] == 1.0 and "warning" not in result.horizon
    assert result.n_pruned_trials >= 3
    finished = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("feasible")]
    for trial in finished:
        attrs = trial.user_attrs
        horizon = 2 * N_TRAIN
        truth = tasks.curve_loss(
            attrs["micro_batch_size"], attrs["accumulation_steps"], attrs["learning_rate"], horizon
        )
        trained_whole_horizon = horizon >= attrs["effective_batch_size"]
        if trained_whole_horizon:
            assert attrs["horizon_share"] == 1.0 and attrs["loss_at_horizon_kind"] == "measured"
            assert attrs["loss_at_horizon"] == pytest.approx(truth)
        assert [step for step in trial.intermediate_values] == [37, 111, 333][-len(trial.intermediate_values) :]
    rec = result.recommended
    best = min(t.user_attrs["loss_at_horizon"] for t in finished)
    assert rec["horizon_share"] == 1.0 and rec["loss_at_horizon"] <= best * 1.02 + 1e-12
    tied = [t for t in finished if t.user_attrs["loss_at_horizon"] <= best * 1.02]
    assert rec["throughput"] == max(t.user_attrs["samples_per_second"] for t in tied)  # ties go to the faster
    from optuna_dashboard import get_note

    note = get_note(study)
    assert "Recommended for a run of 2 epochs." in note and "whole horizon" in note


@pytest.mark.slow
def test_a_study_short_of_the_horizon_predicts_the_loss_there_and_says_so(tmp_path):
    # Every trial may train 2% of a 50-epoch horizon: the recommendation cannot rest on the stated minimum share.
    horizon = 50 * N_TRAIN
    result = tune(
        **CURVES,
        horizon="50 epochs",
        max_trial_samples=horizon // 50,
        memory_budget="256MiB",
        n_trials=8,
        storage=f"sqlite:///{tmp_path}/h.db",
    )
    rec = result.recommended
    assert rec["horizon_share"] < MIN_HORIZON_SHARE
    assert "2%" in result.horizon["warning"] and f"{MIN_HORIZON_SHARE:.0%}" in result.horizon["warning"]
    assert rec["loss_at_horizon_kind"] in ("predicted", "last measured (no curve fit)")
    predicted = [t.user_attrs for t in result.study.trials if t.user_attrs.get("loss_at_horizon_kind") == "predicted"]
    assert predicted, "no trial's curve was fitted"
    for attrs in predicted:
        prediction = attrs["horizon_prediction"]
        assert prediction["target_samples"] == horizon and prediction["spread"] > 0
        assert math.isfinite(attrs["loss_at_horizon"])
    from optuna_dashboard import get_note

    assert "Warning: the recommendation rests on trials that trained 2%" in get_note(result.study)


def test_a_horizon_is_checked_before_the_storage_is_touched(tmp_path):
    for bad in ("0ep", "-3 epochs", "3 parsecs", 3):
        with pytest.raises(InvalidParameterError, match="horizon"):
            tune(**CURVES, horizon=bad, n_trials=1, storage=f"sqlite:///{tmp_path}/h.db")
    assert not (tmp_path / "h.db").exists()


def test_the_cli_names_the_horizon_option(run_cli, tmp_path):
    done = run_cli("tune", "digits-mlp", "--horizon", "0ep", "--storage", f"sqlite:///{tmp_path}/h.db")
    assert done.returncode == 2 and "--horizon" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run_cli("tune", "digits-mlp", "--study-time", "3ep", "--storage", f"sqlite:///{tmp_path}/h.db")
    assert done.returncode == 2 and "--study-time" in done.stderr and "duration" in done.stderr
    assert not (tmp_path / "h.db").exists()
