"""``autobatch worker`` on PostgreSQL, stopped with Ctrl-C mid-study and started again.

The interrupted trial must be settled (FAIL, with the reason, and its config queued
again), not left RUNNING for a grace period to find; the restarted worker joins the
study without probing again, runs the queued config first and finishes the study.
Search trials of ``SlowSyntheticBackend`` take 2 s, long enough to be caught mid-trial.
"""

from __future__ import annotations

import signal

import pytest

from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.reliability_tasks import (
    FAST_HEARTBEAT,
    SLOW,
    by_state,
    error_lines,
    running_trial_of,
    start_cli,
    study_trials,
    study_user_attrs,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.reliability]

STUDY_TRIALS = 4


def test_a_worker_interrupted_on_postgres_settles_its_trial_and_a_restart_finishes_the_study(
    postgres_url,  # noqa: F811
    tmp_path,
):
    command = ["worker", *SLOW, "--storage", postgres_url, "--study-name", "resume"]
    command += ["--study-trials", str(STUDY_TRIALS), *FAST_HEARTBEAT]
    first = start_cli(*command, cwd=tmp_path)

    def one_done_one_running():
        done = by_state(study_trials(postgres_url, "resume")).get("COMPLETE", [])
        return len(done) >= 1 and running_trial_of(postgres_url, "resume", first.pid)

    interrupted = wait_until(one_done_one_running, 120, "a finished trial and a slow one running")
    finished = {t.number: (t.params, t.values) for t in by_state(study_trials(postgres_url, "resume"))["COMPLETE"]}
    probe = study_user_attrs(postgres_url, "resume")["autobatch_probe"]
    first.send_signal(signal.SIGINT)  # to the worker alone, as `kill -INT` would
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr[-3000:]
    [line] = error_lines(stderr, "worker")
    assert "interrupted" in line and "Traceback" not in stderr

    # Settled at once: nothing RUNNING, the trial failed with its reason, its config queued again.
    trials = {t.number: t for t in study_trials(postgres_url, "resume")}
    assert "RUNNING" not in by_state(trials.values())
    assert trials[interrupted.number].state.name == "FAIL"
    assert "interrupted" in trials[interrupted.number].user_attrs["error"]
    [queued] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == interrupted.number]
    assert queued.state.name == "WAITING" and queued.params == interrupted.params

    second = start_cli(*command, cwd=tmp_path)
    stdout, stderr = second.communicate(timeout=180)
    assert second.returncode == 0, stderr[-3000:]
    assert "probe " not in stderr  # joined the study as it was
    assert "Recommended: micro-batch" in stdout
    trials = {t.number: t for t in study_trials(postgres_url, "resume")}
    states = by_state(trials.values())
    assert trials[queued.number].state.name == "COMPLETE"  # the interrupted config ran again
    assert trials[queued.number].params == interrupted.params
    assert len(states["COMPLETE"]) == STUDY_TRIALS  # the study's goal, reached
    assert set(states) == {"COMPLETE", "FAIL"} and [t.number for t in states["FAIL"]] == [interrupted.number]
    for number, (params, values) in finished.items():
        assert (trials[number].params, trials[number].values) == (params, values)  # finished trials kept
    assert study_user_attrs(postgres_url, "resume")["autobatch_probe"] == probe
