"""Many workers on one study: storages, the create-once probe lock, local workers, GPUs per worker.

Tests marked ``distributed`` need PostgreSQL (see tests/postgres.py): they fail, not
skip, when ``CI`` is set and no server can be had.
"""

import collections
import json
import subprocess
import sys
import threading
import time

import optuna
import pytest
from sqlalchemy.engine import make_url

from autobatch import InvalidParameterError, StorageError, tune
from autobatch.search.coordination import PROBE_LOCK_PREFIX, READY_ATTR, create_once
from autobatch.search.local_workers import check_worker_options, gpu_assignments, run_local_workers
from autobatch.search.storage import normalize_storage_url, open_storage, redact, sqlite_path
from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.reliability_tasks import (
    ROOT,
    SYNTHETIC,
    error_lines,
    start_cli,
    study_names,
    study_trials,
    study_user_attrs,
)

SYNTHETIC_KWARGS = dict(
    task="tests.synthetic_backend:workload",
    backend="tests.synthetic_backend:SyntheticBackend",
    memory_budget="256MiB",
    device="cpu",
)


# One GPU per worker.


def test_gpus_go_to_workers_in_turn():
    assert gpu_assignments(4, None, 2) == ["0", "1", "0", "1"]
    assert gpu_assignments(3, None, 8) == ["0", "1", "2"]
    assert gpu_assignments(3, "5,7", 8) == ["5", "7", "5"]  # the parent's own selection is honoured
    assert gpu_assignments(2, "GPU-aa, GPU-bb", 0) == ["GPU-aa", "GPU-bb"]
    assert gpu_assignments(2, None, 0) == [None, None]  # no GPU: the environment is left alone
    assert gpu_assignments(2, "", 4) == [None, None]  # CUDA_VISIBLE_DEVICES="" hides every GPU


def test_local_workers_get_a_gpu_and_a_seed_each(monkeypatch):
    import autobatch.core.devices
    import autobatch.search.local_workers as distributed

    started = []

    class FakeProcess:
        def __init__(self, command, env, **kwargs):
            import json

            started.append((env.get("CUDA_VISIBLE_DEVICES"), json.loads(open(command[-1]).read())))
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(autobatch.core.devices, "cuda_device_count", lambda: 3)
    monkeypatch.setattr(distributed.subprocess, "Popen", FakeProcess)
    study = optuna.create_study()
    run_local_workers(study, 4, {"seed": 10, "device": "cuda:0"}, spread_gpus=True)
    assert [gpu for gpu, _ in started] == ["0", "1", "2", "0"]
    assert [spec["seed"] for _, spec in started] == [10, 11, 12, 13]
    assert all(spec["device"] == "cuda:0" for _, spec in started)  # each sees its one GPU as cuda:0
    started.clear()
    run_local_workers(study, 2, {"seed": None, "device": "cuda:1"}, spread_gpus=False)  # a device was named
    assert [gpu for gpu, _ in started] == [None, None]


# Storage URLs.


def test_storage_urls():
    assert normalize_storage_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_storage_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_storage_url("sqlite:///a.db") == "sqlite:///a.db"
    assert redact("postgresql+psycopg://user:secret@host:5432/db") == "postgresql+psycopg://user:***@host:5432/db"
    assert str(sqlite_path("sqlite:///a/b.db")) == "a/b.db"
    assert str(sqlite_path("sqlite:////tmp/b.db")) == "/tmp/b.db"
    assert str(sqlite_path("journal:////tmp/s.log")) == "/tmp/s.log"
    assert sqlite_path("sqlite:///:memory:") is None


def test_worker_options_are_validated():
    with pytest.raises(InvalidParameterError, match="n_workers=0"):
        check_worker_options(0, None, 10, 60)
    with pytest.raises(InvalidParameterError, match="study_trials=-1"):
        check_worker_options(1, -1, 10, 60)
    with pytest.raises(
        InvalidParameterError, match="grace_period=5 is invalid: must be longer than heartbeat_interval"
    ):
        check_worker_options(1, None, 10, 5)
    check_worker_options(2, 10, None, None)


def _schema_race(url, processes=4):
    """Open a fresh storage from several processes at the same instant."""
    code = (
        "import sys, time\n"
        "from autobatch.search.storage import open_storage\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "open_storage(sys.argv[1])\n"
    )
    start = time.time() + 2.0
    running = [
        subprocess.Popen([sys.executable, "-c", code, url, str(start)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    return [(p.wait(timeout=60), p.stderr.read()) for p in running]


def test_workers_opening_a_new_sqlite_file_together_do_not_race_the_schema(tmp_path):
    # Optuna alone fails here (table studies already exists / alembic_version UNIQUE).
    url = f"sqlite:///{tmp_path}/race.db"
    for code, stderr in _schema_race(url):
        assert code == 0, stderr[-2000:]
    import sqlite3

    with sqlite3.connect(tmp_path / "race.db") as connection:
        assert connection.execute("select count(*) from version_info").fetchone()[0] == 1
        assert connection.execute("select count(*) from alembic_version").fetchone()[0] == 1


@pytest.mark.distributed
def test_workers_opening_a_new_postgres_database_together_do_not_race_the_schema(postgres_url):  # noqa: F811
    for code, stderr in _schema_race(postgres_url):
        assert code == 0, stderr[-2000:]
    storage = open_storage(postgres_url)
    with storage.engine.connect() as connection:
        import sqlalchemy

        assert connection.execute(sqlalchemy.text("select count(*) from version_info")).scalar() == 1
        assert connection.execute(sqlalchemy.text("select count(*) from alembic_version")).scalar() == 1


# The study and its probe, once.


def _make_ready(storage, name, calls, seconds=0.0):
    def create():
        calls.append(threading.get_ident())
        time.sleep(seconds)
        study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
        storage.set_study_user_attr(study_id, "autobatch", {})
        storage.set_study_user_attr(study_id, READY_ATTR, {"max_micro_batch": 1})

    return create


def test_create_once_runs_the_probe_in_one_worker_only(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    calls, created = [], []
    create = _make_ready(storage, "shared", calls, seconds=1.0)
    threads = [
        threading.Thread(target=lambda: created.append(create_once(storage, "shared", create))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(created) == [False, False, False, True]
    assert [s.study_name for s in storage.get_all_studies()] == ["shared"]  # the lock is gone


def test_a_prober_that_died_is_replaced_and_a_failed_probe_releases_the_lock(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    # A lock whose holder never beats: taken over once its grace has passed.
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], PROBE_LOCK_PREFIX + "orphan")
    calls = []
    started = time.monotonic()
    assert create_once(storage, "orphan", _make_ready(storage, "orphan", calls), lock_grace=1.0) is True
    assert len(calls) == 1 and 1.0 <= time.monotonic() - started < 10

    def broken():
        raise ValueError("the probe failed")

    with pytest.raises(ValueError, match="the probe failed"):
        create_once(storage, "bad", broken)
    assert sorted(s.study_name for s in storage.get_all_studies()) == ["orphan"]  # no lock, no half study
    assert create_once(storage, "bad", _make_ready(storage, "bad", calls)) is True


def test_a_study_of_another_kind_is_not_joined(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    foreign = optuna.create_study(study_name="foreign", storage=url)
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with pytest.raises(StorageError, match="'foreign' already exists and is not an autobatch study"):
        create_once(open_storage(url), "foreign", lambda: None)


# Local workers and journal files.


@pytest.mark.slow
def test_tune_with_two_local_workers_on_sqlite(run_cli, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    done = run_cli(
        "tune", *SYNTHETIC, "--trials", "6", "--workers", "2", "--storage", url, "--study-name", "local", timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Recommended: micro-batch" in done.stdout
    trials = study_trials(url, "local")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    workers = collections.Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) == 2, workers  # both workers ran trials
    assert sum(1 for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("trial ")) == 6


@pytest.mark.slow
def test_a_journal_file_holds_a_study_too(tmp_path):
    url = f"journal:///{tmp_path}/study.log"  # journal:/// + an absolute path = journal:////tmp/...
    first = tune(**SYNTHETIC_KWARGS, n_trials=2, storage=url, study_name="journal")
    again = tune(**SYNTHETIC_KWARGS, n_trials=2, n_workers=2, storage=url, study_name="journal")
    assert first.n_trials == 2 and again.n_trials == 4
    assert again.probe == first.probe
    assert again.storage == url


# PostgreSQL: one study, many workers.


@pytest.mark.distributed
@pytest.mark.reliability
def test_three_workers_on_postgres_run_fifteen_trials_with_one_probe(postgres_url, tmp_path):  # noqa: F811
    workers = [
        start_cli(
            "worker", *SYNTHETIC, "--storage", postgres_url, "--study-name", "shared", "--trials", "5", cwd=tmp_path
        )
        for _ in range(3)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    password = make_url(postgres_url).password
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
        assert "Recommended: micro-batch" in stdout
        # The summary names the storage, so the URL does reach the output: redacted, in any spelling.
        assert make_url(postgres_url).render_as_string(hide_password=True) in stdout
        assert password not in stdout + stderr
    trials = study_trials(postgres_url, "shared")
    assert sorted(t.number for t in trials) == list(range(15))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(collections.Counter(t.user_attrs["worker"] for t in trials).values()) == [5, 5, 5]
    # One probe: one worker printed probe lines, as many as the study records.
    probe_lines = [
        [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("probe ")] for _, stderr in outputs
    ]
    probes = study_user_attrs(postgres_url, "shared")[READY_ATTR]["probes"]
    assert sorted(len(lines) for lines in probe_lines) == [0, 0, len(probes)]
    assert study_names(postgres_url) == ["shared"]  # the probe lock is gone
    # Nor does the study keep it (attrs, note, plots), where the dashboard would show it to all who open it.
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    system_attrs = study._storage.get_study_system_attrs(study._study_id)  # the note and the plots
    stored = [study.user_attrs, system_attrs] + [[t.user_attrs, t.system_attrs] for t in study.trials]
    assert "note" in json.dumps(system_attrs)
    assert password not in json.dumps(stored, default=str)


@pytest.mark.distributed
def test_worker_errors_name_the_database_without_its_password(postgres_url, run_cli):  # noqa: F811
    wrong_password = "not-the-password-" + make_url(postgres_url).password
    wrong = make_url(postgres_url).set(password=wrong_password).render_as_string(hide_password=False)
    assert wrong_password in wrong
    done = run_cli("worker", *SYNTHETIC, "--storage", wrong, "--study-name", "s", "--trials", "1")
    assert done.returncode == 2
    [line] = error_lines(done.stderr, "worker")
    # The line names the database (host, port, name) with the password starred out, and the
    # password appears nowhere in what the command printed.
    redacted = make_url(wrong).render_as_string(hide_password=True)
    assert "password authentication failed" in line and f"storage={redacted!r}" in line
    assert wrong_password not in done.stdout + done.stderr
