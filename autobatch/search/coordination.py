"""Many workers, one study: the study and its probe made once, trials claimed, lost trials retried.

This is Optuna's own distributed mode: every worker opens the same storage
(:mod:`autobatch.search.storage`) and runs ask → trial → tell against it. What autobatch adds:

- :func:`create_once`: the study and its memory-wall probe are made exactly once. The
  worker that creates the study ``autobatch-probe-lock:NAME`` (an atomic insert into a
  unique column, on every storage) probes and then creates the real study; the others
  wait for it. A prober that dies stops beating and is replaced.
- :func:`claim_trial`: the next trial of a worker, its first heartbeat recorded at once,
  with lost trials failed and queued again first and a study-wide goal counted under
  :func:`study_lock`; :func:`trial_heartbeat` beats while the trial runs, and
  :func:`settled_on_interrupt` never leaves a trial RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from autobatch.errors import StorageError
from autobatch.search.storage import file_lock, retry_callback, sqlite_path

#: seconds between a running trial's heartbeats (``None`` turns heartbeats off)
DEFAULT_HEARTBEAT_INTERVAL = 10
#: seconds without a heartbeat after which a running trial counts as lost
DEFAULT_GRACE_PERIOD = 60
#: the study-name prefix of the lock held while a study is being probed and created
PROBE_LOCK_PREFIX = "autobatch-probe-lock:"
#: the study user attr that says the probe is done and the study is ready to join
READY_ATTR = "autobatch_probe"
#: the study user attr that holds its settings, set first when a study is made
SETTINGS_ATTR = "autobatch"

_POSTGRES_STUDY_LOCK = int.from_bytes(b"abgo", "big")  # first key of a study's lock; the study id is the second
_POLL_SECONDS = 0.5


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
            trials = study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            )
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
    with file_lock(f"{Path(path).resolve()}#{study._study_id}"):
        yield


def complete_trial_count(study) -> int:
    """Trials that ran to a verdict: complete, or pruned on their intermediate losses."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def worker_label() -> str:
    """This worker as trials and messages name it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


def ask(study):
    """``study.ask()``, without Optuna's warning that heartbeats need ``optimize``: :func:`trial_heartbeat` beats."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


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
