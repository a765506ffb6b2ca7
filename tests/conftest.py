"""Shared fixtures, and one rule: under CI, a test that cannot run for want of a requirement fails.

A missing framework or module (``pytest.importorskip``), a missing PostgreSQL server or a missing
Chromium is a skip on a developer's machine, where the extra may simply not be installed. In CI,
which installs all of them (``.ci/run`` exports ``CI=true``), the same skip would let the run go
green without the tests having run, so the hooks below turn it into a failure, at collection
(a module-level ``importorskip``) and at run time. Skips that say "not on this machine" for a
reason CI cannot fix stay skips: ``gpu`` tests (CI has no GPU) and every ``skipif``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: how a skip for a missing requirement starts (see :func:`skip_missing`)
MISSING_REQUIREMENT = "missing requirement:"
#: how ``pytest.importorskip`` words the skip of a module that will not import
IMPORTORSKIP = "could not import '"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_missing(requirement: str, detail: str) -> NoReturn:
    """Skip for want of ``requirement`` (PostgreSQL, Chromium); under CI the hooks below make it a failure."""
    pytest.skip(f"{MISSING_REQUIREMENT} {requirement}: {detail}")


def _is_missing_requirement(report) -> bool:
    if not report.skipped or hasattr(report, "wasxfail"):
        return False
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    return reason.startswith((MISSING_REQUIREMENT, IMPORTORSKIP))


def _fail_under_ci(report) -> None:
    longrepr = report.longrepr
    reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"CI is set, so a missing requirement fails instead of skipping: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if in_ci() and item.get_closest_marker("gpu") is None and _is_missing_requirement(report):
        _fail_under_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if in_ci() and _is_missing_requirement(report):
        _fail_under_ci(report)
    return report


@pytest.fixture
def run_cli(tmp_path):
    """Run ``autobatch ARGS`` as a user would, in ``tmp_path``; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 600, cwd: Path | None = None):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run(
            [sys.executable, "-m", "autobatch", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or tmp_path,
            env=env,
        )

    return run


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")
