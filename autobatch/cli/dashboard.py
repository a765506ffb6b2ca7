"""``autobatch dashboard``: serve optuna-dashboard on a stored study until Ctrl-C.

It listens on 127.0.0.1 (nothing further unless ``--host`` says so) and never creates a
storage (see :mod:`autobatch.report.dashboard`).
"""

from __future__ import annotations

import argparse
import signal

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def add_command(commands) -> None:
    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard on a study storage (Ctrl-C stops it)")
    dashboard.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autobatch.db)")
    dashboard.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)"
    )
    dashboard.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    dashboard.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.errors import InvalidParameterError
    from autobatch.report.dashboard import dashboard_server
    from autobatch.search.storage import DEFAULT_STORAGE, redact

    if not 0 <= args.port <= 65535:
        raise InvalidParameterError("--port", args.port, "must be a port number in [0, 65535] (0 picks a free one)")
    url = args.storage or DEFAULT_STORAGE
    server = dashboard_server(url, args.host, args.port)
    # Ctrl-C stops it even when started in the background (where SIGINT comes ignored), and
    # a service manager's SIGTERM stops it as cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_keyboard_interrupt)
    try:
        host, port = server.server_address[:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(
            f"optuna-dashboard for {redact(url)} at http://{shown_host}:{port}/dashboard (Ctrl-C stops it)", flush=True
        )
        if host not in ("127.0.0.1", "::1"):
            print(
                f"note: listening on {args.host}: other machines can reach it, and the dashboard has no login",
                flush=True,
            )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("dashboard stopped", flush=True)
    return 0


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
