"""Serving a stored study to a person: open a storage without creating one, choose its study, serve the dashboard.

Neither the dashboard nor the report creates a storage: a SQLite or journal file that does not
exist is an error, not a new, empty study.
"""

from __future__ import annotations

from autobatch.errors import AutobatchError, InvalidParameterError, StorageError
from autobatch.search.storage import normalize_storage_url, open_storage, redact, sqlite_path


def dashboard_server(url: str, host: str, port: int):
    """A threaded WSGI server of optuna-dashboard for the storage at ``url``, listening on ``host:port``."""
    storage = open_existing_storage(url)
    try:
        import optuna_dashboard
    except ImportError:
        raise AutobatchError("optuna-dashboard is not installed: pip install 'autobatch[dashboard]'") from None
    return _make_server(host, port, optuna_dashboard.wsgi(storage))


def open_existing_storage(url: str):
    """The Optuna storage at ``url``; a SQLite or journal file that does not exist is an error, not created."""
    path = sqlite_path(normalize_storage_url(url)) if isinstance(url, str) else None
    if path is not None and not path.is_file():
        raise StorageError(
            f"storage={redact(url)!r}: the file {str(path)!r} does not exist; run `autobatch tune` first "
            "or name the study's storage with --storage"
        )
    return open_storage(url)


def only_study_name(url: str) -> str:
    """The name of the one autobatch study in ``url`` (a report needs --study-name when there are several)."""
    import optuna

    storage = open_existing_storage(url)
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if "autobatch" in s.user_attrs
    ]
    if len(names) == 1:
        return names[0]
    if not names:
        raise StorageError(f"storage={redact(url)!r} holds no autobatch study")
    raise InvalidParameterError("study_name", None, f"the storage holds several studies, name one of {sorted(names)}")


def _make_server(host: str, port: int, app):
    """A threaded WSGI server on ``host:port``: the dashboard's page asks for several things at once."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # one line per request would bury the address
            pass

    class ThreadingServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = ThreadingServer((host, port), QuietHandler)
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, socket.gaierror):
            raise InvalidParameterError("--host", host, f"is not an address of this machine ({reason})") from None
        raise InvalidParameterError(
            "--port", port, f"cannot listen on {host}:{port} ({reason}); choose another port"
        ) from None
    server.set_app(app)
    return server
