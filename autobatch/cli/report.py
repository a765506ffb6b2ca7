"""``autobatch report``: write a stored study's four plots as PNG files (see :mod:`autobatch.report.png_report`)."""

from __future__ import annotations

import argparse

DEFAULT_REPORT_DIR = "autobatch-report"


def add_command(commands) -> None:
    report = commands.add_parser("report", help="write a stored study's plots as PNG files")
    report.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autobatch.db)")
    report.add_argument("--study-name", default=None, help="study name (default: the storage's only autobatch study)")
    report.add_argument(
        "--out", default=DEFAULT_REPORT_DIR, help=f"folder for the PNG files (default {DEFAULT_REPORT_DIR})"
    )
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.errors import AutobatchError
    from autobatch.report.dashboard import only_study_name
    from autobatch.search.results import load_study_result
    from autobatch.search.storage import DEFAULT_STORAGE

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AutobatchError("matplotlib is not installed: pip install 'autobatch[dashboard]'") from None
    from autobatch.report.png_report import write_report

    url = args.storage or DEFAULT_STORAGE
    study_name = args.study_name or only_study_name(url)
    result = load_study_result(url, study_name)
    paths = write_report(result.study, args.out, result)
    print(f"study {study_name!r}: {len(paths)} plots in {args.out}")
    for path in paths:
        print(f"  {path}")
    return 0
