"""Many workers, one study: shared storages, a probe done once, lost trials retried.

This is Optuna's own distributed mode: every worker opens the same storage and runs
ask → trial → tell against it. What autobatch adds:

- :func:`open_storage`: SQLite, PostgreSQL (``postgresql+psycopg://``) or an Optuna
  journal file (``journal:///study.log``), with the schema created under a lock so that
  workers starting together do not race Optuna's table creation and alembic stamp,
  and with heartbeats so a worker killed mid-trial has its trial failed and re-queued.
- :func:`create_once`: the study and its memory-wall probe are made exactly once. The
  worker that creates the study ``autobatch-probe-lock:NAME`` (an atomic insert into a
  unique column, on every storage) probes and then creates the real study; the others
  wait for it. A prober that dies stops beating and is replaced.
- :func:`run_local_workers`: ``autobatch tune --workers N`` on one machine, one GPU each.

The storage URL forms:

``sqlite:///relative.db``, ``sqlite:////absolute/path.db``
    one file; fine for one machine, with several local workers.
``postgresql+psycopg://user:password@host:5432/dbname``
    one server for many machines (``postgresql://`` means the same: psycopg 3).
``journal:///relative.log``, ``journal:////absolute/path.log``
    an Optuna JournalStorage file, for a shared file system without a database server.
    It has no heartbeat, so a killed worker's trial stays RUNNING (Ctrl-C is handled).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from autobatch.errors import AutobatchError, InvalidParameterError, StorageError, first_line

#: seconds between a running trial's heartbeats (``None`` turns heartbeats off)
DEFAULT_HEARTBEAT_INTERVAL = 10
#: seconds without a heartbeat after which a running trial counts as lost
DEFAULT_GRACE_PERIOD = 60
#: how often the config of a lost trial is queued again before it is given up
MAX_RETRIES = 3
#: the study-name prefix of the lock held while a study is being probed and created
PROBE_LOCK_PREFIX = "autobatch-probe-lock:"
#: the study user attr that says the probe is done and the study is ready to join
READY_ATTR = "autobatch_probe"
#: the study user attr that holds its settings, set first when a study is made
SETTINGS_ATTR = "autobatch"

_POSTGRES_LOCK_KEY = int.from_bytes(b"autobatc", "big")  # pg_advisory_lock key of schema creation
_POSTGRES_STUDY_LOCK = int.from_bytes(b"abgo", "big")  # first key of a study's lock; the study id is the second
_POLL_SECONDS = 0.5


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """The Optuna storage for ``url``, its schema created once, with errors that say what is wrong.

    With ``heartbeat_interval`` (an RDB storage only), running trials send heartbeats and a
    trial silent for ``grace_period`` seconds is failed by the next worker that asks for a
    trial, and its config queued again (up to :data:`MAX_RETRIES` times).
    """
    if not isinstance(url, str) or not url:
        raise InvalidParameterError("storage", url, "must be a database URL such as sqlite:///autobatch.db")
    url = normalize_storage_url(url)
    if url.startswith("journal:"):
        return _open_journal(url)
    if url.startswith("sqlite:"):
        _check_sqlite_path(url)
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # local workers take turns writing
    elif url.startswith("postgresql"):
        engine_kwargs.update(pool_pre_ping=True, connect_args={"connect_timeout": 10})
    options: dict[str, Any] = {}
    if heartbeat_interval is not None:
        options.update(
            heartbeat_interval=int(heartbeat_interval),
            grace_period=int(grace_period) if grace_period is not None else None,
            heartbeat_stale_trial_callback=retry_callback(),
        )
    try:
        with _schema_lock(url, engine_kwargs), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **options)
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(f"storage={redact(url)!r} cannot be opened: {first_line(error)}") from None


def normalize_storage_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3, the driver autobatch installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and reports."""
    if not isinstance(url, str) or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` or ``journal:///`` URL (None for other URLs and in-memory SQLite)."""
    for prefix in ("sqlite:///", "journal:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :].split("?", 1)[0]
            return Path(rest) if rest and rest != ":memory:" else None
    return None


def _check_sqlite_path(url: str) -> None:
    path = sqlite_path(url)
    if path is None:
        return
    folder = path.parent
    if not folder.exists():
        raise StorageError(f"storage={url!r}: the folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise StorageError(f"storage={url!r}: {str(folder)!r} is not a folder")
    target = path if path.exists() else folder  # a new file needs a writable folder
    if not os.access(target, os.W_OK):
        raise StorageError(f"storage={url!r}: {str(target)!r} is not writable")


def _open_journal(url: str):
    import optuna

    path = sqlite_path(url)
    if path is None:
        raise InvalidParameterError("storage", url, "a journal file is journal:///relative.log or journal:////abs.log")
    _check_sqlite_path(url)
    try:
        return optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    except Exception as error:
        raise StorageError(f"storage={url!r} cannot be opened: {first_line(error)}") from None


@contextlib.contextmanager
def _schema_lock(url: str, engine_kwargs: dict):
    """Hold a lock that every process opening ``url`` takes while Optuna creates its schema.

    Optuna creates the tables, inserts its version row and stamps alembic on first use;
    two processes doing that at once fail or leave duplicate rows. SQLite is local, so a
    file lock does; PostgreSQL has advisory locks that work across machines.
    """
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
        if path is None:
            yield
            return
        with _file_lock(f"{path.resolve()}#schema"):
            yield
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        try:
            try:
                connection = engine.connect()
            except Exception as error:
                raise StorageError(f"storage={redact(url)!r} cannot be opened: {first_line(error)}") from None
            with connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _POSTGRES_LOCK_KEY})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _POSTGRES_LOCK_KEY})
        finally:
            engine.dispose()
        return
    yield  # other databases: Optuna's own start-up, unguarded


def retry_callback(max_retry: int = MAX_RETRIES):
    """Optuna's callback that queues a lost trial's config again (``RetryFailedTrialCallback``'s new name)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


# The study and its probe, once.


def create_once(
    storage,
    study_name: str,
    create: Callable[[], None],
    *,
    lock_interval: float = 2.0,
    lock_grace: float = float(DEFAULT_GRACE_PERIOD),
    on_wait: Callable[[dict], None] | None = None,
) -> bool:
    """Make sure study ``study_name`` exists and is ready; True if this process made it.

    ``create()`` probes and creates the study, setting :data:`READY_ATTR` last. It runs in
    one process only, the one that wins the lock; the others wait until the study is
    ready, or until the winner fails (then one of them tries in its turn, and meets the
    same error if the input is bad) or stops beating for ``lock_grace`` seconds.
    """
    import optuna
    from optuna.study import StudyDirection

    lock_name = PROBE_LOCK_PREFIX + study_name
    watch = _StaleWatch(lock_grace)
    announced = False
    while True:
        state = _study_state(storage, study_name)
        if state == "ready":
            return False
        lock = _read_lock(storage, lock_name)
        if lock is None:
            if state == "foreign":
                # The prober sets READY_ATTR before it lets the lock go: look once more.
                if _study_state(storage, study_name) == "ready":
                    return False
                raise StorageError(
                    f"study_name={study_name!r} already exists and is not an autobatch study; choose another study name"
                )
            try:
                lock_id = storage.create_new_study([StudyDirection.MINIMIZE], lock_name)
            except optuna.exceptions.DuplicatedStudyError:
                continue  # another worker won the lock a moment ago
            with _LockHolder(storage, lock_id, lock_interval):
                if _study_state(storage, study_name) == "ready":
                    return False  # made between our look and our lock
                create()
                return True
        lock_id, attrs = lock
        if watch.is_stale(lock_id, attrs.get("beat")):
            _delete_study(storage, lock_id)  # its holder died mid-probe: the next round elects another
            continue
        if on_wait is not None and not announced:
            on_wait(attrs)
            announced = True
        time.sleep(_POLL_SECONDS)


def _study_state(storage, study_name: str) -> str:
    """``absent``; ``ready``; ``partial``: made by a prober that died before marking it ready
    (its successor finishes it); ``foreign``: some other kind of study."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
        attrs = storage.get_study_user_attrs(study_id)
    except KeyError:
        return "absent"
    if READY_ATTR in attrs:
        return "ready"
    return "partial" if SETTINGS_ATTR in attrs else "foreign"


def _read_lock(storage, lock_name: str):
    try:
        lock_id = storage.get_study_id_from_name(lock_name)
        return lock_id, storage.get_study_user_attrs(lock_id)
    except KeyError:
        return None


def _delete_study(storage, study_id: int) -> None:
    try:
        storage.delete_study(study_id)
    except KeyError:
        pass


class _StaleWatch:
    """Notices a lock whose beat has not changed for ``grace`` seconds of this machine's clock.

    Only changes are compared, never timestamps, so clocks that differ between machines
    do not matter.
    """

    def __init__(self, grace: float):
        self.grace = grace
        self.seen: tuple | None = None
        self.since = 0.0

    def is_stale(self, lock_id: int, beat) -> bool:
        now = time.monotonic()
        if self.seen != (lock_id, beat):
            self.seen, self.since = (lock_id, beat), now
            return False
        return now - self.since > self.grace


class _LockHolder:
    """Holds the probe lock: beats while the probe runs, deletes the lock when done or failed."""

    def __init__(self, storage, lock_id: int, interval: float):
        self.storage = storage
        self.lock_id = lock_id
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="autobatch-probe-lock", daemon=True)

    def __enter__(self):
        self.storage.set_study_user_attr(self.lock_id, "holder", {"host": socket.gethostname(), "pid": os.getpid()})
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(timeout=30)
        _delete_study(self.storage, self.lock_id)
        return False

    def _beat(self) -> None:
        beat = 0
        while not self.stop.is_set():
            try:
                self.storage.set_study_user_attr(self.lock_id, "beat", beat)
            except Exception:
                pass  # a missed beat is harmless; a long outage makes the others take over
            beat += 1
            self.stop.wait(self.interval)


def remove_if_empty(url: str, existed_before: bool) -> None:
    """Remove a SQLite/journal file this call created when it holds no study (bad input leaves none)."""
    path = sqlite_path(normalize_storage_url(url)) if isinstance(url, str) else None
    if existed_before or path is None or not path.exists():
        return
    try:
        storage = open_storage(url)
        empty = not storage.get_all_studies()
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
    except AutobatchError:
        return
    if empty:
        for suffix in ("", "-journal", "-wal", "-shm", ".lock"):
            with contextlib.suppress(OSError):
                Path(str(path) + suffix).unlink()


# Trials: heartbeats, lost trials, interrupted trials, a study-wide goal.


def ask(study):
    """``study.ask()``, without Optuna's warning that heartbeats need ``optimize``: :func:`trial_heartbeat` beats."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


@contextlib.contextmanager
def trial_heartbeat(study, trial_id: int):
    """Beat for ``trial_id`` while the block runs (when the storage has heartbeats)."""
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:
                pass  # a missed beat is harmless; the grace period covers several
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"autobatch-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def fail_lost_trials(study) -> None:
    """Fail trials whose worker stopped beating, and queue their configs again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_interrupted_trial(study, trial, reason: str) -> None:
    """Record a trial stopped by Ctrl-C as FAIL and queue its config again, so a resumed study runs it.

    SIGINT is ignored meanwhile (on the main thread), so a second Ctrl-C cannot leave
    the trial RUNNING.
    """
    from optuna.trial import TrialState

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", reason)
        try:
            study.tell(trial, state=TrialState.FAIL)
        except Exception:
            return  # already finished: another worker declared it lost and retries it
        with contextlib.suppress(Exception):
            frozen = study._storage.get_trial(trial._trial_id)
            retry_callback()(study, frozen)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_trial(study, goal: int | None, deadline: float | None, before_ask: Callable[[], None] | None = None):
    """The next trial of this worker, or None once the study holds ``goal`` finished (complete or pruned) trials.

    Lost trials are failed (and queued again) first, and ``ask`` pops a queued config
    before drawing a new one. With a ``goal``, workers count and ask one at a time
    (:func:`study_lock`), so together they start exactly as many trials as it takes.
    When the trials still missing run in other workers, this one waits for them, not
    starts more: they complete, or their worker is lost and they come back to the
    queue, to be run here. It stops waiting at ``deadline`` (``time.monotonic()``).
    """
    from optuna.trial import TrialState

    fail_lost_trials(study)
    if goal is None:
        _before_ask(study, before_ask)
        return _ask_and_beat(study)
    while True:
        with study_lock(study):
            # A pruned trial ran and was judged, as in Optuna's own n_trials: it counts toward the goal.
            trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            complete = sum(1 for t in trials if t.state != TrialState.RUNNING)
            if complete >= goal:
                return None
            if len(trials) < goal:
                _before_ask(study, before_ask)
                return _ask_and_beat(study)
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_SECONDS)
        fail_lost_trials(study)


def _before_ask(study, before_ask: Callable[[], None] | None) -> None:
    """Run ``before_ask`` (which queues a config) only when nothing waits in the queue: ``ask``
    pops the oldest queued config, and one queued behind it could outlive the study."""
    from optuna.trial import TrialState

    if before_ask is not None and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        before_ask()


def _ask_and_beat(study):
    """Ask, and record the trial's first heartbeat at once: Optuna never counts a trial lost
    that has not beaten, so a worker killed right after asking would leave it RUNNING for good.
    Ctrl-C waits until both are done, then fails the trial rather than leaving it RUNNING."""
    trial = None
    try:
        with _sigint_deferred():
            trial = ask(study)
            storage = study._storage
            if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
                with contextlib.suppress(Exception):
                    storage.record_heartbeat(trial._trial_id)
    except KeyboardInterrupt:
        if trial is not None:
            fail_interrupted_trial(study, trial, f"interrupted (Ctrl-C) in worker {worker_label()}")
        raise
    return trial


@contextlib.contextmanager
def settled_on_interrupt(study, trial):
    """Whatever stops the block (Ctrl-C while the result is being recorded, say), the trial
    does not stay RUNNING: it is failed, and on Ctrl-C its config is queued again."""
    from optuna.trial import TrialState

    try:
        yield
    except BaseException as error:
        with contextlib.suppress(Exception):
            if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                if isinstance(error, KeyboardInterrupt):
                    fail_interrupted_trial(study, trial, f"interrupted (Ctrl-C) in worker {worker_label()}")
                else:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C that arrives inside the block until its end (on the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def study_lock(study):
    """A lock on ``study`` that all its workers share: PostgreSQL advisory locks across machines,
    a file lock for SQLite and journal files (one machine), none for other storages."""
    backend = getattr(study._storage, "_backend", study._storage)
    url = getattr(backend, "url", None)
    if isinstance(url, str) and url.startswith("postgresql"):
        import sqlalchemy

        keys = {"kind": _POSTGRES_STUDY_LOCK, "study": int(study._study_id)}
        lock = sqlalchemy.text("SELECT pg_advisory_lock(CAST(:kind AS integer), CAST(:study AS integer))")
        unlock = sqlalchemy.text("SELECT pg_advisory_unlock(CAST(:kind AS integer), CAST(:study AS integer))")
        with backend.engine.connect() as connection:
            connection.execute(lock, keys)
            try:
                yield
            finally:
                connection.execute(unlock, keys)
        return
    path = sqlite_path(url) if isinstance(url, str) else getattr(getattr(backend, "_backend", None), "_file_path", None)
    if path is None:
        yield
        return
    with _file_lock(f"{Path(path).resolve()}#{study._study_id}"):
        yield


@contextlib.contextmanager
def _file_lock(name: str):
    """An exclusive lock among the processes of this machine, named by ``name``."""
    folder = Path(tempfile.gettempdir()) / f"autobatch-locks-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    digest = hashlib.sha1(name.encode()).hexdigest()[:16]
    with open(folder / f"{digest}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def complete_trial_count(study) -> int:
    """Trials that ran to a verdict: complete, or pruned on their intermediate losses."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# Local workers: ``autobatch tune --workers N``.


def check_worker_options(
    n_workers: int, study_trials: int | None, heartbeat_interval: int | None, grace_period: int | None
) -> None:
    """Validate the distributed options of :func:`autobatch.tune` (before any storage is touched)."""
    for name, value, allow_none in (
        ("n_workers", n_workers, False),
        ("study_trials", study_trials, True),
        ("heartbeat_interval", heartbeat_interval, True),
        ("grace_period", grace_period, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "must be an integer >= 1" + (", or None" if allow_none else "")
            raise InvalidParameterError(name, value, allowed)
    if heartbeat_interval is not None and grace_period is not None and grace_period <= heartbeat_interval:
        raise InvalidParameterError(
            "grace_period", grace_period, f"must be longer than heartbeat_interval ({heartbeat_interval} s)"
        )


def default_budget(n_workers: int, device: str) -> str:
    """90% of the device, shared by the local workers that run on it at once."""
    return f"{90 / workers_per_device(n_workers, device):g}%"


def check_workers_fit(n_workers: int, device: str, budget_bytes: int) -> None:
    """Local workers sharing a device must fit on it together."""
    if n_workers <= 1:
        return
    sharing = workers_per_device(n_workers, device)
    if sharing <= 1:
        return
    from autobatch.core.memory import device_memory_bytes, format_bytes

    total = device_memory_bytes(device)
    if sharing * budget_bytes > total:
        raise InvalidParameterError(
            "memory_budget",
            format_bytes(budget_bytes),
            f"{sharing} workers share {device}, and {sharing} x the budget exceeds its "
            f"{format_bytes(total)}; lower the budget or the number of workers",
        )


def gpu_assignments(n_workers: int, visible: str | None, device_count: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``n_workers`` workers: the GPUs in turn.

    ``visible`` is the parent's own ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), honoured when
    set; otherwise GPUs ``0 .. device_count-1``. With no GPU, every worker gets None.
    """
    if visible is not None:
        gpus = [part.strip() for part in visible.split(",") if part.strip()]
    else:
        gpus = [str(index) for index in range(device_count)]
    if not gpus:
        return [None] * n_workers
    return [gpus[index % len(gpus)] for index in range(n_workers)]


def workers_per_device(n_workers: int, device: str) -> int:
    """How many of ``n_workers`` local workers share one device."""
    if not device.startswith("cuda"):
        return n_workers
    from autobatch.core.devices import cuda_device_count

    gpus = set(gpu_assignments(n_workers, os.environ.get("CUDA_VISIBLE_DEVICES"), cuda_device_count())) - {None}
    return math.ceil(n_workers / len(gpus)) if gpus else n_workers


def run_local_workers(
    study,
    n_workers: int,
    worker_kwargs: dict,
    *,
    spread_gpus: bool,
    on_trial: Callable[[Any], None] | None = None,
    describe: Callable[[Any], Any] | None = None,
) -> None:
    """Run ``n_workers`` worker processes on ``study`` until they finish; report their trials.

    Each worker runs ``tune(**worker_kwargs)`` in its own process (and session: the
    parent forwards one Ctrl-C to each), with its own sampler seed and, with
    ``spread_gpus``, its own GPU. A worker that fails stops the others.
    """
    from optuna.trial import TrialState

    from autobatch.core.devices import cuda_device_count

    gpus = (
        gpu_assignments(n_workers, os.environ.get("CUDA_VISIBLE_DEVICES"), cuda_device_count())
        if spread_gpus
        else [None] * n_workers
    )
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    seen = {t.number for t in study.get_trials(deepcopy=False, states=finished)}
    with tempfile.TemporaryDirectory(prefix="autobatch-workers-") as folder:
        processes = []
        for index, gpu in enumerate(gpus):
            spec = dict(worker_kwargs)
            base_seed = spec.get("seed")
            spec["seed"] = None if base_seed is None else base_seed + index
            spec["sys_path"] = [p for p in sys.path if p]
            spec_path = Path(folder) / f"worker-{index}.json"
            spec_path.write_text(json.dumps(spec))
            env = dict(os.environ)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            log = open(Path(folder) / f"worker-{index}.log", "wb")
            processes.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "autobatch.search.distributed", str(spec_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    ),
                    log,
                )
            )

        def report_new_trials() -> None:
            for trial in study.get_trials(deepcopy=False, states=finished):
                if trial.number not in seen:
                    seen.add(trial.number)
                    if on_trial is not None and describe is not None:
                        record = describe(trial)
                        if record is not None:
                            on_trial(record)

        failure = None
        try:
            while any(process.poll() is None for process, _ in processes):
                report_new_trials()
                for index, (process, log) in enumerate(processes):
                    if failure is None and process.returncode not in (None, 0):
                        failure = (index, process.returncode, _last_line(Path(log.name)))
                        _stop(processes)
                time.sleep(_POLL_SECONDS)
            report_new_trials()
        except KeyboardInterrupt:
            _stop(processes)
            raise
        finally:
            for _, log in processes:
                log.close()
        for index, (process, log) in enumerate(processes):
            if failure is None and process.returncode != 0:
                failure = (index, process.returncode, _last_line(Path(log.name)))
        if failure is not None:
            index, code, line = failure
            if code == 130:
                raise KeyboardInterrupt
            raise AutobatchError(f"worker {index} stopped (exit code {code}): {line or 'no output'}")


def _stop(processes, wait: float = 60.0) -> None:
    """Ctrl-C each running worker (it fails and re-queues its trial), then wait for it."""
    for process, _ in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + wait
    for process, _ in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def _worker_main(spec_path: str) -> int:
    """One local worker: ``python -m autobatch.search.distributed SPEC.json`` (started by run_local_workers)."""
    spec = json.loads(Path(spec_path).read_text())
    for entry in reversed(spec.pop("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # preemption: stop like Ctrl-C

    from autobatch.core.config import TrialBudget
    from autobatch.search.space import SearchSpace
    from autobatch.search.study import tune

    spec["search_space"] = SearchSpace.from_dict(spec["search_space"])
    spec["trial_budget"] = TrialBudget.from_dict(spec["trial_budget"])
    try:
        tune(**spec)
    except KeyboardInterrupt:
        print(f"worker {worker_label()}: interrupted", file=sys.stderr)
        return 130
    except AutobatchError as error:
        print(f"worker {worker_label()}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
