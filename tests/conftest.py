import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


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
