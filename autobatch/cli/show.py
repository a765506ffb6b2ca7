"""``autobatch show``: print a stored study's recommendation and Pareto front."""

from __future__ import annotations

import argparse
import json

from autobatch.cli._common import add_storage_arguments


def add_command(commands) -> None:
    show = commands.add_parser("show", help="print a stored study's recommendation and Pareto front")
    add_storage_arguments(show)
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.errors import InvalidParameterError
    from autobatch.search.note import summary_text
    from autobatch.search.results import load_study_result
    from autobatch.search.storage import DEFAULT_STORAGE

    if not args.study_name:
        raise InvalidParameterError("study_name", args.study_name, "name the study to show")
    result = load_study_result(args.storage or DEFAULT_STORAGE, args.study_name)
    print(json.dumps(result.to_dict(), indent=2) if args.json else summary_text(result))
    return 0
