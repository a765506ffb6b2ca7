"""Study paths that no other test walks: a trial over ``--trial-timeout``, the late refinement
steps, the NSGA-II and GP samplers, ``--powers-of-two``, and a real OOM among the search trials.

The synthetic backend (tests/synthetic_backend.py) keeps the study tests fast; the OOM trial
runs a real PyTorch task under a real budget (tests/study_path_tasks.py).
"""

from __future__ import annotations

import json
import math

import optuna
import pytest

from autobatch import SearchSpace, TrialBudget, tune
from autobatch.cli.main import main as cli_main
from autobatch.search import new_study
from autobatch.search.results import is_feasible, pareto_front, recommend
from autobatch.search.runner import refinement_steps
from tests import study_path_tasks

pytestmark = pytest.mark.slow

SYNTHETIC = dict(
    task="tests.synthetic_backend:workload",
    backend="tests.synthetic_backend:SyntheticBackend",
    memory_budget="256MiB",
    device="cpu",
)


def _enqueue_after_first_trial(url: str, study_name: str, params: dict):
    """An ``on_trial`` callback that queues ``params`` once the first trial is done."""

    def on_trial(record) -> None:
        if record.number == 0:
            optuna.load_study(study_name=study_name, storage=url).enqueue_trial(params)

    return on_trial


def test_a_trial_over_the_trial_timeout_is_recorded_and_the_study_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    micro, accumulation = study_path_tasks.SLEEPY_CONFIG
    seen = []
    queue = _enqueue_after_first_trial(
        url, "timeout", {"micro_batch_size": micro, "accumulation_steps": accumulation, "lr_offset_decades": 0.0}
    )

    def on_trial(record):
        seen.append(record)
        queue(record)

    # Trials 0 and 1 are the study's starting points, trial 2 the sleeper, trial 3 a late refinement.
    result = tune(
        **{**SYNTHETIC, "backend": "tests.study_path_tasks:SleepyBackend"},
        n_trials=4,
        trial_timeout=5.0,
        storage=url,
        study_name="timeout",
        on_trial=on_trial,
    )
    trials = result.study.trials
    sleeper = trials[2]
    assert (sleeper.user_attrs["micro_batch_size"], sleeper.user_attrs["accumulation_steps"]) == (micro, accumulation)
    assert sleeper.state.name == "FAIL" and sleeper.user_attrs["status"] == "timeout"
    assert "time limit of 5 s" in sleeper.user_attrs["error"] and sleeper.user_attrs["feasible"] is False
    # Stopped at the limit, not waited out.
    assert (sleeper.datetime_complete - sleeper.datetime_start).total_seconds() < study_path_tasks.SLEEP_SECONDS / 2
    assert seen[2].result.status == "timeout"
    # The study went on: the trial after it ran, and the summary counts the one failure.
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert result.n_trials == 4 and result.n_failed_trials == 1 and result.n_oom_trials == 0
    assert result.recommended is not None and result.recommended["trial_number"] != 2


def test_late_in_a_pareto_study_every_other_trial_steps_from_the_recommendation(tmp_path):
    n_trials = 10  # late = the last 35%: trials 7, 8 and 9 here; the odd ones refine
    result = tune(**SYNTHETIC, n_trials=n_trials, storage=f"sqlite:///{tmp_path}/s.db", seed=3, objective="pareto")
    trials = result.study.trials
    space = SearchSpace()
    refined, steps_at = [], {}
    for trial in trials[2:]:  # 0 and 1 are the study's starting points
        earlier = [t for t in trials[: trial.number] if t.state.name == "COMPLETE" and is_feasible(t)]
        incumbent = recommend(pareto_front(earlier), 0.02)  # the recommendation when the trial was asked
        steps_at[trial.number] = refinement_steps(
            incumbent.params, space, result.max_micro_batch, result.horizon["max_effective_batch"]
        )
        if any(_same_params(trial.params, step) for step in steps_at[trial.number]):
            refined.append(trial.number)
    assert refined == [7, 9]
    # One step after another: the first refinement takes the first step, the second the second.
    assert _same_params(trials[7].params, steps_at[7][0]) and _same_params(trials[9].params, steps_at[9][1])


def _same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-12, abs_tol=1e-12) for k in a)


def _spy_on_a_quicker_sampler(monkeypatch, name: str, quicker, sampler_class):
    """Have the study use ``quicker(seed)`` for ``name``; returns a count of the trials its model proposed.

    NSGA-II's first generation and GP's first trials are random: the study's own settings
    (population 10, 10 startup trials) reach the samplers' models only after some 14 and 11
    trials, as NSGA-II counts toward a generation only the trials it sampled itself (the
    study's starting points and refinements are enqueued). ``quicker`` is the same sampler,
    reaching its model within a short study; the count is of ``sample_relative`` calls that
    returned params.
    """
    make_sampler = new_study.make_sampler

    def make(sampler_name, seed):
        assert sampler_name == name and isinstance(make_sampler(sampler_name, seed), sampler_class)
        return quicker(seed)

    monkeypatch.setattr(new_study, "make_sampler", make)
    proposed = [0]
    sample_relative = sampler_class.sample_relative

    def counted(sampler, study, trial, search_space):
        params = sample_relative(sampler, study, trial, search_space)
        proposed[0] += bool(params)
        return params

    monkeypatch.setattr(sampler_class, "sample_relative", counted)
    return proposed


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_nsga2_searches_powers_of_two_from_the_command_line_and_recommends_one(monkeypatch, capsys, tmp_path):
    proposed = _spy_on_a_quicker_sampler(
        monkeypatch,
        "nsga2",
        lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=4),
        optuna.samplers.NSGAIISampler,
    )
    url = f"sqlite:///{tmp_path}/s.db"
    code = cli_main(
        [
            "tune",
            SYNTHETIC["task"],
            "--backend",
            SYNTHETIC["backend"],
            "--memory-budget",
            "256MiB",
            "--device",
            "cpu",
            "--sampler",
            "nsga2",
            "--powers-of-two",
            "--trials",
            "8",
            "--storage",
            url,
            "--study-name",
            "nsga2",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    result = json.loads(captured.out)
    assert result["n_trials"] == 8 and result["n_failed_trials"] == 0
    assert proposed[0] >= 1  # the second generation, bred from the first
    trials = optuna.load_study(study_name="nsga2", storage=url).trials
    searched = [t.user_attrs["micro_batch_size"] for t in trials]
    assert all(_is_power_of_two(m) for m in searched), searched
    assert all(2 ** t.params["micro_batch_log2"] == t.user_attrs["micro_batch_size"] for t in trials)
    assert len(set(searched)) >= 3  # it searched, not one size over and over
    assert _is_power_of_two(result["recommended"]["micro_batch_size"])
    assert result["recommended"]["micro_batch_size"] <= result["max_micro_batch"]


def test_the_gp_sampler_runs_a_study_and_recommends(monkeypatch, tmp_path):
    pytest.importorskip("scipy")
    pytest.importorskip("torch")  # Optuna's GPSampler fits its model with both
    proposed = _spy_on_a_quicker_sampler(
        monkeypatch,
        "gp",
        lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=4),
        optuna.samplers.GPSampler,
    )
    result = tune(**SYNTHETIC, n_trials=5, sampler="gp", storage=f"sqlite:///{tmp_path}/s.db")
    assert result.n_trials == 5 and result.n_failed_trials == 0
    assert proposed[0] == 1  # trial 4 (a GP suggestion takes seconds: one is enough)
    recommended = result.recommended
    assert recommended is not None and recommended["micro_batch_size"] <= result.max_micro_batch
    assert result.pareto_front and recommended["trial_number"] in {t["trial_number"] for t in result.pareto_front}


def test_a_search_trial_past_the_wall_runs_out_of_memory_for_real_and_is_not_recommended(tmp_path):
    pytest.importorskip("torch")
    url = f"sqlite:///{tmp_path}/s.db"
    over = 2 * study_path_tasks.CLIFF
    # The search may go past the probe's wall (a maximum set by hand, and an effective batch past
    # the 1-epoch horizon's); the flat memory model predicts that `over` fits, so it is run rather
    # than skipped.
    result = tune(
        "tests.study_path_tasks:cliff",
        "torch",
        memory_budget="1GiB",
        device="cpu",
        n_trials=3,
        storage=url,
        study_name="cliff",
        search_space=SearchSpace(max_micro_batch=128, max_effective_batch=128),
        trial_budget=TrialBudget(train_samples=256),
        max_trial_samples=256,
        on_trial=_enqueue_after_first_trial(
            url, "cliff", {"micro_batch_size": over, "accumulation_steps": 1, "lr_offset_decades": 0.0}
        ),
    )
    assert result.max_micro_batch <= study_path_tasks.CLIFF
    trials = result.study.trials
    oom = trials[2]
    attrs = oom.user_attrs
    assert attrs["micro_batch_size"] == over and attrs["skipped_by_model"] is False  # it was run
    assert attrs["status"] == "oom" and attrs["oom"] is True and attrs["oom_phase"] == "train"
    assert "can't allocate memory" in attrs["error"]
    # COMPLETE, so the sampler learns from it, with a positive (infeasible) memory constraint.
    assert oom.state.name == "COMPLETE" and oom.constraints["memory"] > 0 and attrs["feasible"] is False
    assert result.n_oom_trials == 1
    # Left out of the recommendation and the front; the trials under the wall fitted.
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs["status"] == "ok" and t.constraints["memory"] <= 0 for t in trials[:2])
    assert result.recommended is not None and result.recommended["trial_number"] != 2
    assert result.recommended["micro_batch_size"] <= result.max_micro_batch
    assert 2 not in {t["trial_number"] for t in result.pareto_front}
