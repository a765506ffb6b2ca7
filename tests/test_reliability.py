"""Crash, kill, interrupt and bad-input behaviour of studies and workers (marker ``reliability``).

The synthetic backend keeps these fast: what they test is the study around the trials,
not a framework. PostgreSQL variants are also marked ``distributed``.
"""

import datetime
import os
import signal
import socket
import time

import optuna
import psutil
import pytest

from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.reliability_tasks import (
    FAST_HEARTBEAT,
    SLOW,
    SLOWER,
    SYNTHETIC,
    by_state,
    error_lines,
    is_slow_and_running,
    running_trial_of,
    start_cli,
    study_trials,
    study_user_attrs,
    trial_count,
    wait_until,
)

pytestmark = pytest.mark.reliability


def _storage_url(kind, request, tmp_path):
    if kind == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path}/s.db"


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.distributed)])
def test_a_worker_killed_mid_trial_has_its_trial_failed_and_retried_by_another(kind, request, tmp_path):
    url = _storage_url(kind, request, tmp_path)
    command = ["worker", *SLOW, "--storage", url, "--study-name", "kill", "--study-trials", "5", *FAST_HEARTBEAT]
    doomed = start_cli(*command, cwd=tmp_path)
    survivor = start_cli(*command, cwd=tmp_path)
    lost = wait_until(lambda: running_trial_of(url, "kill", doomed.pid), 120, "the doomed worker to be mid-trial")
    doomed.kill()  # SIGKILL: no chance to tell anyone
    doomed.wait()
    stdout, stderr = survivor.communicate(timeout=180)
    assert survivor.returncode == 0, stderr[-3000:]

    trials = {t.number: t for t in study_trials(url, "kill")}
    states = by_state(trials.values())
    assert trials[lost.number].state.name == "FAIL"  # failed by the survivor, once its heartbeat stopped
    [retry] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.state.name == "COMPLETE" and retry.params == trials[lost.number].params
    assert retry.user_attrs["worker"] == f"{socket.gethostname()}:{survivor.pid}"
    assert len(states["COMPLETE"]) == 5  # the study completes its trial count
    assert set(states) == {"COMPLETE", "FAIL"} and len(states["FAIL"]) == 1  # nothing RUNNING or WAITING


def test_an_interrupted_tune_resumes_and_loses_no_finished_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    command = ["tune", *SLOW, "--storage", url, "--study-name", "resume", *FAST_HEARTBEAT]
    tuning = start_cli(*command, "--trials", "8", cwd=tmp_path)

    def two_done_one_running():
        states = by_state(study_trials(url, "resume"))
        return len(states.get("COMPLETE", [])) >= 2 and running_trial_of(url, "resume", tuning.pid)

    interrupted = wait_until(two_done_one_running, 120, "two finished trials and a third running")
    finished = {t.number: (t.params, t.values, t.user_attrs) for t in by_state(study_trials(url, "resume"))["COMPLETE"]}
    probe = study_user_attrs(url, "resume")["autobatch_probe"]
    tuning.send_signal(signal.SIGINT)
    _, stderr = tuning.communicate(timeout=60)
    assert tuning.returncode == 130
    assert error_lines(stderr, "tune") == ["autobatch tune: interrupted"] and "Traceback" not in stderr

    trials = {t.number: t for t in study_trials(url, "resume")}
    assert "RUNNING" not in by_state(trials.values())  # consistent: nothing left running
    assert trials[interrupted.number].state.name == "FAIL"
    assert "interrupted" in trials[interrupted.number].user_attrs["error"]
    [queued] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == interrupted.number]
    assert queued.state.name == "WAITING"  # queued again for the resumed study

    resumed = start_cli(*command, "--trials", "2", cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "probe " not in stderr  # not probed again
    trials = {t.number: t for t in study_trials(url, "resume")}
    for number, (params, values, attrs) in finished.items():
        assert (trials[number].params, trials[number].values, trials[number].user_attrs) == (params, values, attrs)
    assert trials[queued.number].state.name == "COMPLETE"  # the interrupted config ran first
    assert len(by_state(trials.values())["COMPLETE"]) == len(finished) + 2
    assert study_user_attrs(url, "resume")["autobatch_probe"] == probe


@pytest.mark.parametrize("command", ["worker", "tune --workers 2"])
def test_ctrl_c_kills_the_trial_processes_fails_their_trials_and_exits_130(command, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    name, *extra = command.split()
    goal = ["--trials", "10"] if name == "tune" else ["--study-trials", "10"]
    process = start_cli(
        name, *SLOWER, *extra, *goal, "--storage", url, "--study-name", "ctrl-c", *FAST_HEARTBEAT, cwd=tmp_path
    )
    workers = 2 if extra else 1

    def all_mid_trial():
        running = [t for t in study_trials(url, "ctrl-c") if t.state.name == "RUNNING"]
        # Settled, and far from their end: with 2 s trials one of two once ended before the interrupt reached it
        settled = all(is_slow_and_running(t, settled=0.5) and _running_for(t) < 4.0 for t in running)
        # the trial processes (and, with --workers, the workers)
        descendants = psutil.Process(process.pid).children(recursive=True)
        return len(running) == workers and settled and len(descendants) >= workers and descendants

    descendants = wait_until(all_mid_trial, 120, f"{workers} trials running")
    process.send_signal(signal.SIGINT)  # to this process alone, as `kill -INT` would
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr[-3000:]
    [line] = error_lines(stderr, name)
    assert "interrupted" in line and "Traceback" not in stderr
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    states = by_state(study_trials(url, "ctrl-c"))
    assert "RUNNING" not in states and len(states["FAIL"]) == workers
    assert all("interrupted" in t.user_attrs["error"] for t in states["FAIL"])
    queued = {t.system_attrs.get("failed_trial") for t in states["WAITING"]}
    assert {t.number for t in states["FAIL"]} <= queued  # their configs wait for the next worker


def _running_for(trial) -> float:
    return (datetime.datetime.now() - trial.datetime_start).total_seconds()


# Bad input: one line naming the problem, a non-zero exit, the storage as it was.


def _nan_task_args():
    return [
        "tests.reliability_tasks:nan_loss",
        "--backend",
        "torch",
        "--memory-budget",
        "2GiB",
        "--device",
        "cpu",
        "--samples",
        "64",
    ]


BAD_INPUTS = [
    # (label, command line after `autobatch`, what the error line must say)
    (
        "bounds reversed",
        ["tune", *SYNTHETIC, "--min-micro-batch", "64", "--max-micro-batch", "8"],
        "--max-micro-batch=8 is invalid: must be >= min_micro_batch (64); the bounds are reversed",
    ),
    ("zero micro-batch bound", ["tune", *SYNTHETIC, "--min-micro-batch", "0"], "--min-micro-batch=0 is invalid"),
    ("zero accumulation bound", ["worker", *SYNTHETIC, "--max-accumulation", "0"], "--max-accumulation=0 is invalid"),
    ("unparsable budget", ["tune", *SYNTHETIC, "--memory-budget", "lots"], "--memory-budget='lots' is invalid"),
    ("negative trials", ["tune", *SYNTHETIC, "--trials", "-3"], "--trials=-3 is invalid: must be an integer >= 1"),
    ("negative trials (worker)", ["worker", *SYNTHETIC, "--trials", "-3"], "--trials=-3 is invalid"),
    (
        "unknown sampler",
        ["tune", *SYNTHETIC, "--sampler", "annealing"],
        "--sampler='annealing' is invalid: must be one of",
    ),
    ("unknown task", ["tune", "no-such-task", "--device", "cpu"], "task='no-such-task': no study of that name"),
    (
        "task that raises",
        ["tune", "tests.tasks:factory_raises", "--device", "cpu"],
        "task='tests.tasks:factory_raises': tests.tasks:factory_raises raised ValueError: no data here",
    ),
    ("NaN loss", ["tune", *_nan_task_args()], "the validation loss is nan in every probe"),
    (
        "budget below micro-batch 1",
        ["tune", *SYNTHETIC[:-4], "--memory-budget", "8MiB", "--device", "cpu"],
        "even micro-batch 1 does not fit the memory budget",
    ),
    ("zero workers", ["tune", *SYNTHETIC, "--workers", "0"], ("--workers=0 is invalid", "n_workers=0 is invalid")),
    ("worker without a goal", ["worker", *SYNTHETIC], "give --trials, --study-trials or --timeout"),
    (
        "grace not above the heartbeat",
        ["tune", *SYNTHETIC, "--heartbeat-interval", "5", "--grace-period", "5"],
        ("--grace-period=5 is invalid: must be longer than", "grace_period=5 is invalid: must be longer than"),
    ),
]


@pytest.fixture(scope="module")
def kept_storage(tmp_path_factory):
    """A SQLite storage with an autobatch study (2 trials) and a plain Optuna study (3 trials)."""
    import subprocess
    import sys

    from tests.reliability_tasks import ROOT

    folder = tmp_path_factory.mktemp("kept")
    url = f"sqlite:///{folder}/kept.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autobatch",
            "tune",
            *SYNTHETIC,
            "--trials",
            "2",
            "--storage",
            url,
            "--study-name",
            "kept",
        ],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    foreign = optuna.create_study(study_name="foreign", storage=url)
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    return url


@pytest.mark.parametrize("label, args, expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_line_and_leaves_the_storage_as_it_was(label, args, expected, kept_storage, run_cli):
    before = trial_count(kept_storage)
    args = list(args)
    if label == "worker without a goal":
        args += ["--storage", kept_storage, "--study-name", "kept"]
    else:
        args += ["--storage", kept_storage, "--study-name", "new-study"]
        if args[0] == "worker" and "--trials" not in args:
            args += ["--trials", "2"]
    done = run_cli(*args, timeout=300)
    _assert_one_line_error(done, args[0], expected)
    assert trial_count(kept_storage) == before


@pytest.mark.parametrize(
    "label, args, expected",
    [
        (
            "study of another kind",
            ["--study-name", "foreign"],
            "'foreign' already exists and is not an autobatch study",
        ),
        (
            "same name, other budget",
            ["--study-name", "kept", "--memory-budget", "300MiB"],
            "study_name='kept' was made for memory_budget_bytes=268435456, not 314572800",
        ),
    ],
)
def test_a_study_name_of_another_kind_is_refused(label, args, expected, kept_storage, run_cli):
    before = trial_count(kept_storage)
    done = run_cli("tune", *SYNTHETIC, "--storage", kept_storage, *args, "--trials", "2")
    _assert_one_line_error(done, "tune", expected)
    assert trial_count(kept_storage) == before


@pytest.mark.parametrize(
    "label, url, expected",
    [
        (
            "unreachable database",
            "postgresql+psycopg://autobatch:secret@127.0.0.1:1/none",
            "storage='postgresql+psycopg://autobatch:***@127.0.0.1:1/none' cannot be opened: OperationalError",
        ),
        ("unwritable SQLite path", "sqlite:////proc/autobatch-test.db", "'sqlite:////proc/autobatch-test.db'"),
        ("SQLite path under a file", "sqlite:///{tmp}/a-file/s.db", "is not a folder"),
        ("SQLite folder missing", "sqlite:///{tmp}/missing/s.db", "does not exist"),
    ],
)
@pytest.mark.parametrize("command", ["tune", "worker"])
def test_a_storage_that_cannot_be_opened_is_named(command, label, url, expected, run_cli, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    url = url.format(tmp=tmp_path)
    done = run_cli(command, *SYNTHETIC, "--storage", url, "--study-name", "s", "--trials", "2")
    _assert_one_line_error(done, command, expected)
    assert "secret" not in done.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.distributed
def test_a_wrong_postgres_password_is_named_and_the_study_is_left_alone(postgres_url, run_cli):  # noqa: F811
    storage_study = optuna.create_study(study_name="kept", storage=postgres_url)
    storage_study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    wrong = postgres_url.replace("://autobatch:", "://autobatch:wrong", 1)
    for command in ("tune", "worker"):
        done = run_cli(command, *SYNTHETIC, "--storage", wrong, "--study-name", "kept", "--trials", "2")
        _assert_one_line_error(done, command, 'password authentication failed for user "autobatch"')
        assert "wrong" not in done.stderr
    assert trial_count(postgres_url) == 2


def _assert_one_line_error(done, command, expected):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = error_lines(done.stderr, command)
    assert len(lines) == 1, done.stderr[-3000:]
    options = (expected,) if isinstance(expected, str) else expected  # the flag, or the parameter's name
    assert lines[0].startswith(f"autobatch {command}: error: ") and any(o in lines[0] for o in options), lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["tune", "worker"])
def test_a_process_killed_with_sigkill_leaves_nothing_in_the_temp_folder(command, tmp_path):
    import subprocess
    import sys

    from tests.reliability_tasks import ROOT, wait_until

    url = f"sqlite:///{tmp_path}/s.db"
    temp = tmp_path / "tmp"
    temp.mkdir()
    goal = ["--trials", "8"] if command == "tune" else ["--study-trials", "8"]
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autobatch",
            command,
            *SLOW,
            *goal,
            "--storage",
            url,
            "--study-name",
            "killed",
            *FAST_HEARTBEAT,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
    )
    try:
        wait_until(lambda: running_trial_of(url, "killed", process.pid), 120, "a trial running")
        children = psutil.Process(process.pid).children(recursive=True)
        assert children
    finally:
        process.kill()  # SIGKILL: no chance to clean up after itself
        process.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)  # each notices its parent is gone, and ends
    assert not alive, [p.cmdline() for p in alive]
    # The lock folder is shared by every run of this user, by design, and stays after a clean exit too.
    assert [p.name for p in temp.iterdir() if not p.name.startswith("autobatch-locks-")] == []


def test_a_trial_that_never_ends_dies_with_the_killed_tune_that_started_it(tmp_path):
    # Nothing is left to enforce a trial's time limit once its tune is killed: the worker, blocked
    # waiting for the hung trial, would never read the end of its request pipe. Both die with
    # their parent (PR_SET_PDEATHSIG) instead of holding their memory forever.
    import subprocess
    import sys

    from tests.reliability_tasks import ROOT, wait_until

    url = f"sqlite:///{tmp_path}/s.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    hanging = ["tests.synthetic_backend:workload", "--backend", "tests.reliability_tasks:HangingSyntheticBackend"]
    args = [*hanging, "--trials", "4", "--storage", url, "--study-name", "hung", *FAST_HEARTBEAT]
    process = subprocess.Popen(
        [sys.executable, "-m", "autobatch", "tune", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
    )
    try:
        wait_until(lambda: running_trial_of(url, "hung", process.pid), 120, "a trial running")
        time.sleep(1.0)  # the trial process is forked and asleep in the backend
        children = psutil.Process(process.pid).children(recursive=True)
        assert children  # the worker, running the trial (a fresh process: this backend does not fork)
    finally:
        process.kill()
        process.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
