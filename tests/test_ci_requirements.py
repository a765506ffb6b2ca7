"""Under CI a missing requirement fails the run; elsewhere it skips (the hooks in tests/conftest.py)."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT

NEEDS_MISSING_MODULES = """
import pytest

from tests.conftest import skip_missing


def test_a_missing_module_at_run_time():
    pytest.importorskip("autobatch_no_such_module")


def test_a_missing_server():
    skip_missing("PostgreSQL", "no server binary found")


@pytest.fixture
def browser():
    skip_missing("Chromium", "not installed")


def test_a_missing_browser_in_a_fixture(browser):
    pass


@pytest.mark.gpu
def test_a_gpu_test_without_its_module():
    pytest.importorskip("autobatch_no_such_module")


def test_a_skip_for_another_reason():
    pytest.skip("not on this operating system")


@pytest.mark.xfail(reason="known bug")
def test_an_expected_failure():
    assert False
"""

NEEDS_A_MISSING_MODULE_AT_IMPORT = """
import pytest

pytest.importorskip("autobatch_no_such_module")


def test_never_collected():
    pass
"""


def _run_pytest(tmp_path, ci: str | None) -> tuple[int, dict[str, int], str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_at_run_time.py").write_text(NEEDS_MISSING_MODULES)
    (tmp_path / "test_at_import.py").write_text(NEEDS_A_MISSING_MODULE_AT_IMPORT)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    # The collection error would stop the session (as it stops CI); going on shows every outcome.
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-rA",
            "--continue-on-collection-errors",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    summary = done.stdout.strip().splitlines()[-1]
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", summary)}
    return done.returncode, counts, done.stdout


def test_under_ci_a_missing_module_server_or_browser_fails_the_run(tmp_path):
    code, counts, output = _run_pytest(tmp_path, "true")
    assert code == 1, output
    # run time: the module and the server fail, the browser's fixture errors; collection: the module-level skip
    assert counts == {"failed": 2, "errors": 2, "skipped": 2, "xfailed": 1}, output
    for outcome, test in (
        ("FAILED", "test_at_run_time.py::test_a_missing_module_at_run_time"),
        ("FAILED", "test_at_run_time.py::test_a_missing_server"),
        ("ERROR", "test_at_run_time.py::test_a_missing_browser_in_a_fixture"),
        ("ERROR", "test_at_import.py"),
    ):
        assert f"{outcome} {test} - CI is set, so a missing requirement fails" in output, test
    assert "could not import 'autobatch_no_such_module'" in output


def test_without_ci_the_same_tests_skip(tmp_path):
    for ci in (None, "", "false"):
        code, counts, output = _run_pytest(tmp_path, ci)
        assert code == 0, output
        assert counts == {"skipped": 6, "xfailed": 1}, output
