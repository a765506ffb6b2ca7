"""The ``autobatch`` command line: the parser of every command, and how a command's error is shown.

``trial`` runs one trial, ``tune`` a study and ``show`` prints a stored one; ``worker``
joins a shared study, ``train`` trains with a config, ``dashboard`` and ``report``
inspect a study, ``devices`` says what autobatch sees.

Bad input ends with one line on stderr that names the option, and exit code 2;
a trial that runs out of memory is a result, not a failure (exit 0).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from autobatch.cli import dashboard, devices, export, report, show, train, trial, tune, worker
from autobatch.cli._common import FLAGS
from autobatch.errors import AutobatchError, InvalidParameterError

#: the commands in the order ``autobatch --help`` lists them; each module adds its own parser
COMMANDS = (trial, tune, show, export, train, worker, dashboard, report, devices)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # A task named "my_task:factory" lives in the working directory, as an app does for uvicorn or
    # gunicorn; the console script's own sys.path starts at its bin folder instead. Workers inherit it.
    if "" not in sys.path and sys.path[:1] != [str(Path.cwd())]:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return args.handler(args)
    except InvalidParameterError as error:
        flags = {**FLAGS, **getattr(args, "flag_names", {})}
        flag = flags.get(error.parameter, error.parameter)
        print(f"autobatch {args.command}: error: {flag}={error.value!r} is invalid: {error.allowed}", file=sys.stderr)
        return 2
    except AutobatchError as error:
        print(f"autobatch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autobatch {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobatch",
        description="Find the micro-batch size, accumulation steps and learning rate that train fastest without OOM.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_command(commands)
    return parser
