"""The trial worker: a real budget, real OOMs, and failures that come back as results."""

import json
import re

import pytest

pytest.importorskip("torch")

from autobatch import TrialBudget, TrialConfig, run_trial  # noqa: E402
from autobatch.errors import BackendNotFoundError, InvalidParameterError  # noqa: E402

pytestmark = pytest.mark.slow
GIB = 2**30


def test_a_large_micro_batch_runs_out_of_memory_in_training_under_a_real_budget():
    result = run_trial("synthetic-images", "torch", TrialConfig(4096), memory_budget="1GiB")
    assert result.status == "oom" and result.oom_phase == "train"
    assert "can't allocate memory" in result.error
    assert result.memory_budget_bytes == GIB


def test_a_small_micro_batch_fits_the_same_budget():
    result = run_trial("synthetic-images", "torch", TrialConfig(16), memory_budget="1GiB", budget=TrialBudget(512))
    assert result.status == "ok", result.error
    assert result.samples_per_second > 0
    assert result.baseline_memory_bytes < result.peak_memory_bytes < GIB
    assert {"framework_import", "task_load", "worker_start", "trial", "wall"} <= set(result.timings)


def test_an_oom_in_evaluation_is_placed_in_eval():
    # Training at 8 fits in 600 MB; one evaluation batch of all 512 validation images does not.
    result = run_trial(
        "synthetic-images",
        "torch",
        TrialConfig(8),
        memory_budget="600MB",
        budget=TrialBudget(train_samples=64, eval_batch_size=512),
    )
    assert result.status == "oom" and result.oom_phase == "eval", result


def test_a_worker_killed_by_a_signal_is_reported_not_propagated():
    result = run_trial("tests.tasks:killed", "torch", TrialConfig(4), budget=TrialBudget(64))
    assert result.status == "error"
    assert "SIGKILL" in result.error


def test_an_exception_in_user_code_is_reported_with_its_reason():
    result = run_trial("tests.tasks:raises", "torch", TrialConfig(4), budget=TrialBudget(64))
    assert result.status == "error"
    assert "failed on purpose" in result.error


def test_a_trial_over_its_time_limit_is_stopped():
    result = run_trial("tests.tasks:sleeps", "torch", TrialConfig(4), budget=TrialBudget(64), timeout=8)
    assert result.status == "timeout"
    assert result.timings["wall"] < 30


def test_bad_arguments_fail_in_the_caller_before_any_worker_starts():
    with pytest.raises(BackendNotFoundError):
        run_trial("digits-mlp", "jax", TrialConfig(4))
    with pytest.raises(InvalidParameterError, match="memory_budget"):
        run_trial("digits-mlp", "torch", TrialConfig(4), memory_budget="lots")


def test_cli_trial_reports_oom_as_json_with_exit_zero(run_cli):
    done = run_cli(
        "trial", "synthetic-images", "--backend", "torch", "--micro-batch", "4096", "--memory-budget", "1GiB", "--json"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "oom" and result["oom_phase"] == "train"


def test_cli_trial_fits_at_16(run_cli):
    done = run_cli(
        "trial", "synthetic-images", "--backend", "torch", "--micro-batch", "16", "--memory-budget", "1GiB", "--json"
    )
    result = json.loads(done.stdout)
    assert result["status"] == "ok" and result["samples_per_second"] > 0
    assert result["peak_memory_bytes"] < result["memory_budget_bytes"] == GIB


@pytest.mark.parametrize(
    "args, named",
    [
        (["digits-mlp", "--micro-batch", "0"], "--micro-batch"),
        (["digits-mlp", "--micro-batch", "4", "--memory-budget", "lots"], "--memory-budget"),
        (["digits-mlp", "--micro-batch", "4", "--backend", "jax"], "backend"),
        (["not_a_module.anywhere:factory", "--micro-batch", "4"], "task"),
        (["digits-mlp", "--micro-batch", "4", "--lr", "-1"], "--lr"),
    ],
)
def test_cli_bad_input_is_one_clear_line_and_exit_2(run_cli, args, named):
    done = run_cli("trial", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_python_dash_m_works(run_cli):
    done = run_cli("--help")
    assert done.returncode == 0 and "trial" in done.stdout


def test_micro_batching_saves_memory_for_real():
    # Same effective batch (512): 32 × 16 holds a sixteenth of the activations of 512 × 1.
    # The contrast is wide on purpose: what a trial holds besides activations (weights,
    # optimizer state, per-thread scratch that grows with the core count) is the same for
    # both, and on a many-core machine it is a large share of the smaller peak.
    from autobatch.process.worker import TrialWorker

    with TrialWorker("synthetic-images", "torch", memory_budget="6GiB") as worker:
        small = worker.run(TrialConfig(32, 16, 1e-3), TrialBudget(train_samples=512))
        large = worker.run(TrialConfig(512, 1, 1e-3), TrialBudget(train_samples=512))
    assert small.status == large.status == "ok"
    above_small = small.peak_memory_bytes - small.baseline_memory_bytes
    above_large = large.peak_memory_bytes - large.baseline_memory_bytes
    assert above_small <= 0.6 * above_large, (above_small, above_large)
    assert small.peak_memory_bytes < large.peak_memory_bytes


def test_a_reused_worker_gives_each_trial_its_own_clean_start():
    from autobatch.process.worker import TrialWorker

    with TrialWorker("synthetic-images", "torch", memory_budget="1GiB") as worker:
        first = worker.run(TrialConfig(16), TrialBudget(train_samples=256))
        big = worker.run(TrialConfig(4096), TrialBudget(train_samples=256))
        again = worker.run(TrialConfig(16), TrialBudget(train_samples=256))
    assert (first.status, big.status, again.status) == ("ok", "oom", "ok")
    # The OOM in between left nothing behind: same start, same peak, same result.
    assert again.peak_memory_bytes == pytest.approx(first.peak_memory_bytes, rel=0.05)
    assert again.val_loss == pytest.approx(first.val_loss, rel=1e-6)
    assert first.timings["framework_import"] > 0 and again.timings["framework_import"] == 0


@pytest.mark.parametrize("command", ["trial", "tune"])
def test_a_budget_below_what_the_framework_needs_to_load_is_one_clear_line(command, run_cli, tmp_path):
    from tests.reliability_tasks import error_lines

    task = ["digits-mlp", "--backend", "torch", "--memory-budget", "1KiB", "--device", "cpu"]
    goal = (
        ["--micro-batch", "4"] if command == "trial" else ["--trials", "2", "--storage", f"sqlite:///{tmp_path}/s.db"]
    )
    done = run_cli(command, *task, *goal)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = error_lines(done.stderr, command)
    assert line.startswith(f"autobatch {command}: error: --memory-budget="), line
    assert re.search(r"must exceed the [\d.]+ MiB that torch needs to import and load the task", line), line
    assert "Traceback" not in done.stderr and "load_error" not in done.stderr
    if command == "trial":  # the worker's own budget, as given (tune's probes run under a share of it)
        assert done.stderr.strip() == line and "'1KiB'" in line


def test_a_forked_trial_that_dies_leaves_its_loaded_worker_for_the_next_trial():
    pytest.importorskip("torch")
    from autobatch.process.worker import TrialWorker

    with TrialWorker("tests.tasks:dies_above_eight", "torch", device="cpu") as worker:
        first = worker.run(TrialConfig(4), TrialBudget(train_samples=16))
        loaded = worker._process
        died = worker.run(TrialConfig(16), TrialBudget(train_samples=32))
        after = worker.run(TrialConfig(4), TrialBudget(train_samples=16))
    assert first.status == after.status == "ok" and died.status != "ok", (first, died, after)
    assert first.extras["worker_mode"] == after.extras["worker_mode"] == "fork"
    # The same loaded process forked the trial after the death: no new interpreter, import or load
    assert worker._process is None and loaded is not None  # closed on leaving the with block
    assert after.timings["framework_import"] == 0.0 and after.timings["worker_start"] == 0.0
