"""``autobatch dashboard`` and ``autobatch report``: look at a stored study in a browser, or as PNG files.

``dashboard`` serves optuna-dashboard on 127.0.0.1 (nothing further unless ``--host`` says
so) until Ctrl-C; ``report`` writes the study's four plots (see :mod:`autobatch.report.plots`).
Neither creates a storage: a SQLite file that does not exist is an error, not a new study.
"""

from __future__ import annotations

import argparse
import signal

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_REPORT_DIR = "autobatch-report"


def add_dashboard_commands(commands, *args) -> None:
    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard on a study storage (Ctrl-C stops it)")
    dashboard.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autobatch.db)")
    dashboard.add_argument("--host", default=DEFAULT_HOST,
                           help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    dashboard.set_defaults(handler=_run_dashboard_command)

    report = commands.add_parser("report", help="write a stored study's plots as PNG files")
    report.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autobatch.db)")
    report.add_argument("--study-name", default=None, help="study name (default: the storage's only autobatch study)")
    report.add_argument("--out", default=DEFAULT_REPORT_DIR, help=f"folder for the PNG files (default {DEFAULT_REPORT_DIR})")
    report.set_defaults(handler=_run_report_command)


def _run_dashboard_command(args: argparse.Namespace) -> int:
    from autobatch.search.distributed import redact
    from autobatch.errors import AutobatchError, InvalidParameterError
    from autobatch.search.study import DEFAULT_STORAGE

    if not 0 <= args.port <= 65535:
        raise InvalidParameterError("--port", args.port, "must be a port number in [0, 65535] (0 picks a free one)")
    url = args.storage or DEFAULT_STORAGE
    storage = open_existing_storage(url)
    try:
        import optuna_dashboard
    except ImportError:
        raise AutobatchError("optuna-dashboard is not installed: pip install 'autobatch[dashboard]'") from None

    server = _make_server(args.host, args.port, optuna_dashboard.wsgi(storage))
    # Ctrl-C stops it even when started in the background (where SIGINT comes ignored), and
    # a service manager's SIGTERM stops it as cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_keyboard_interrupt)
    try:
        host, port = server.server_address[:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"optuna-dashboard for {redact(url)} at http://{shown_host}:{port}/dashboard (Ctrl-C stops it)", flush=True)
        if host not in ("127.0.0.1", "::1"):
            print(f"note: listening on {args.host}: other machines can reach it, and the dashboard has no login", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("dashboard stopped", flush=True)
    return 0


def _run_report_command(args: argparse.Namespace) -> int:
    from autobatch.errors import AutobatchError
    from autobatch.report.plots import write_report
    from autobatch.search.study import DEFAULT_STORAGE, load_study_result

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AutobatchError("matplotlib is not installed: pip install 'autobatch[dashboard]'") from None

    url = args.storage or DEFAULT_STORAGE
    study_name = args.study_name or _only_study_name(url)
    result = load_study_result(url, study_name)
    paths = write_report(result.study, args.out, result)
    print(f"study {study_name!r}: {len(paths)} plots in {args.out}")
    for path in paths:
        print(f"  {path}")
    return 0


def open_existing_storage(url: str):
    """The Optuna storage at ``url``; a SQLite or journal file that does not exist is an error, not created."""
    from autobatch.search.distributed import normalize_storage_url, redact, sqlite_path
    from autobatch.errors import StorageError
    from autobatch.search.study import open_storage

    path = sqlite_path(normalize_storage_url(url)) if isinstance(url, str) else None
    if path is not None and not path.is_file():
        raise StorageError(
            f"storage={redact(url)!r}: the file {str(path)!r} does not exist; run `autobatch tune` first "
            "or name the study's storage with --storage"
        )
    return open_storage(url)


def _only_study_name(url: str) -> str:
    """The name of the one autobatch study in ``url`` (a report needs --study-name when there are several)."""
    import optuna

    from autobatch.search.distributed import redact
    from autobatch.errors import InvalidParameterError, StorageError

    storage = open_existing_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
             if "autobatch" in s.user_attrs]
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

    from autobatch.errors import InvalidParameterError

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
        raise InvalidParameterError("--port", port, f"cannot listen on {host}:{port} ({reason}); choose another port") from None
    server.set_app(app)
    return server


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
