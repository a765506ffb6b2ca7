"""``autobatch devices``: what autobatch can run trials on, and why a device is not usable.

The report is gathered by :mod:`autobatch.report.devices` without importing a framework here.
"""

from __future__ import annotations

import argparse
import json


def add_command(commands) -> None:
    devices = commands.add_parser(
        "devices",
        help="list the devices autobatch sees (CUDA, NVML, PyTorch, TensorFlow, CPU RAM) and why one is not usable",
    )
    devices.add_argument("--json", action="store_true", help="print as JSON")
    devices.add_argument(
        "--no-frameworks", action="store_true", help="skip asking PyTorch and TensorFlow (they take seconds to import)"
    )
    devices.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.report.devices import device_report, devices_text

    report = device_report(frameworks=not args.no_frameworks)
    print(json.dumps(report, indent=2) if args.json else devices_text(report))
    return 0
