"""A trial's time limit counts the trial, not the worker's start: loading the framework and the
task is paid once per worker, and a trial must not lose its time to it."""

from __future__ import annotations

import pytest

from autobatch import TrialBudget, TrialConfig
from autobatch.process.worker import TrialWorker

TASK = "tests.slow_load_tasks:workload"
BACKEND = "tests.synthetic_backend:SyntheticBackend"


@pytest.mark.slow
def test_a_quick_trial_in_a_slow_loading_worker_is_not_timed_out(monkeypatch):
    monkeypatch.setenv("AUTOBATCH_TEST_LOAD_SECONDS", "3")
    with TrialWorker(TASK, BACKEND, fork=True) as worker:
        result = worker.run(TrialConfig(8, 1, 1e-3), TrialBudget(train_samples=64), timeout=1.5)
    assert result.status == "ok", result.error


@pytest.mark.slow
def test_a_trial_that_outlasts_its_limit_is_still_stopped(monkeypatch):
    monkeypatch.setenv("AUTOBATCH_TEST_LOAD_SECONDS", "0")
    monkeypatch.setenv("AUTOBATCH_TEST_TRIAL_SECONDS", "30")
    with TrialWorker(TASK, "tests.slow_load_tasks:SlowTrialBackend", fork=True) as worker:
        result = worker.run(TrialConfig(8, 1, 1e-3), TrialBudget(train_samples=64), timeout=1.5)
    assert result.status == "timeout"
    assert "1.5 s" in result.error
