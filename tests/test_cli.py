"""The command line as a whole: every command answers --help, bad input is one line alone, commands stand apart."""

from __future__ import annotations

import pytest

from tests.test_layout import import_graph

COMMANDS = ("trial", "tune", "show", "export", "train", "worker", "dashboard", "report", "devices")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(run_cli, command):
    done = run_cli(command, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: autobatch {command}") and done.stderr == ""


@pytest.mark.parametrize(
    "args",
    [
        ["tune", "digits-cnn", "--backend", "torch", "--trials", "0"],
        ["worker", "digits-cnn", "--storage", "sqlite:///w.db", "--study-name", "w", "--trials", "-3"],
    ],
    ids=["tune", "worker"],
)
def test_bad_input_is_the_error_line_alone_without_a_progress_bar(run_cli, tmp_path, args):
    done = run_cli(*args, timeout=120)
    assert done.returncode == 2
    # Exactly one line: no progress bar drawn before the error, nor again after it.
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n") and "\r" not in done.stderr, repr(done.stderr)
    assert done.stderr.startswith(f"autobatch {args[0]}: error: --trials=")
    assert done.stdout == ""
    assert not (tmp_path / "w.db").exists() and not (tmp_path / "autobatch.db").exists()


def test_no_command_module_imports_another():
    # Commands share what they share through cli/_common; only cli/main (the dispatcher) knows them all.
    graph = import_graph()
    commands = {f"autobatch.cli.{name}" for name in COMMANDS}
    crossings = sorted(f"{module} -> {target}" for module in commands for target in graph[module] & commands)
    assert crossings == []
