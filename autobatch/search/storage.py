"""Where a study lives: storage URLs, opened once at the boundary, with errors that say what is wrong.

The storage URL forms:

``sqlite:///relative.db``, ``sqlite:////absolute/path.db``
    one file; fine for one machine, with several local workers.
``postgresql+psycopg://user:password@host:5432/dbname``
    one server for many machines (``postgresql://`` means the same: psycopg 3).
``journal:///relative.log``, ``journal:////absolute/path.log``
    an Optuna JournalStorage file, for a shared file system without a database server.
    It has no heartbeat, so a killed worker's trial stays RUNNING (Ctrl-C is handled).

The schema is created under a lock so that workers starting together do not race
Optuna's table creation and alembic stamp, and an RDB storage gets heartbeats so a
worker killed mid-trial has its trial failed and re-queued (:mod:`autobatch.search.coordination`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from autobatch.errors import AutobatchError, InvalidParameterError, StorageError, first_line

DEFAULT_STORAGE = "sqlite:///autobatch.db"
#: how often the config of a lost trial is queued again before it is given up
MAX_RETRIES = 3

_POSTGRES_LOCK_KEY = int.from_bytes(b"autobatc", "big")  # pg_advisory_lock key of schema creation


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


def storage_file_exists(url: str) -> bool:
    """Whether the file of a file storage exists (True for a database server: nothing to create)."""
    path = sqlite_path(normalize_storage_url(url))
    return path is None or path.exists()


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


def retry_callback(max_retry: int = MAX_RETRIES):
    """Optuna's callback that queues a lost trial's config again (``RetryFailedTrialCallback``'s new name)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


@contextlib.contextmanager
def file_lock(name: str):
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
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = sqlite_path(url)
    if path is None:
        raise InvalidParameterError("storage", url, "a journal file is journal:///relative.log or journal:////abs.log")
    _check_sqlite_path(url)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
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
        with file_lock(f"{path.resolve()}#schema"):
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
