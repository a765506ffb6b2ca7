"""The CUDA paths on a real NVIDIA GPU: caps that bite, budgets that hold on the device, a short study.

Skipped without a GPU (CI has none). On a GPU machine: ``make test-gpu``, which sets
``AUTOBATCH_REQUIRE_GPU=1``: there a GPU that NVML sees but a framework cannot use fails the
run instead of skipping it. By hand: ``pytest -m gpu tests/test_gpu.py``.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from autobatch import MemoryBudget, TrialBudget, TrialConfig, run_trial
from autobatch.core.devices import cuda_device_count
from autobatch.process.worker import TrialWorker
from tests.conftest import has_cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(cuda_device_count() == 0, reason="needs an NVIDIA GPU (NVML sees none)"),
]

MIB = 2**20
GIB = 2**30
#: what NVML counts beyond the caching allocator: the CUDA context and the kernels loaded into it
CONTEXT_ALLOWANCE = int(1.5 * GIB)
#: NVML's readings and the allocator's differ by a few pages and by what a 100 ms sample misses
READING_SLACK = 64 * MIB
REQUIRE_GPU = os.environ.get("AUTOBATCH_REQUIRE_GPU") == "1"


def _unusable(reason: str) -> None:
    """NVML sees a GPU that a framework cannot use: a skip, or under ``make test-gpu`` a failure."""
    if REQUIRE_GPU:
        pytest.fail(f"NVML sees a GPU, but {reason} (AUTOBATCH_REQUIRE_GPU=1: the GPU tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def torch_cuda():
    if not has_cuda():
        _unusable("PyTorch cannot use it (a CPU-only build, or no usable GPU)")


@pytest.fixture(scope="module")
def tensorflow_gpu():
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import tensorflow as tf; "
        "print(len(tf.config.list_physical_devices('GPU')))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        _unusable("importing TensorFlow took longer than 300 s")
    if done.returncode != 0 or not done.stdout.strip().isdigit() or int(done.stdout.strip()) == 0:
        _unusable(f"TensorFlow sees no GPU (tensorflow-cpu, or not installed): {done.stderr.strip()[-300:]}")


def _added_on_device(result) -> int:
    """What the trial process added to the device's memory, by NVML's samples (every process included)."""
    telemetry = result.telemetry
    assert "nvml" in telemetry["sources"], telemetry
    return telemetry["peak_device_memory_bytes"] - telemetry["device_memory_at_start_bytes"]


def test_a_micro_batch_over_the_cap_runs_out_of_cuda_memory(torch_cuda):
    # 2048 images of 3x64x64: one 16-channel activation alone is 512 MiB in float32.
    result = run_trial(
        "synthetic-images",
        "torch",
        TrialConfig(2048),
        memory_budget="2GiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=2048),
    )
    assert result.status == "oom" and result.oom_phase == "train", result.error
    assert "CUDA out of memory" in result.error
    assert result.memory_budget_bytes == 2 * GIB
    assert "nvml" in result.telemetry["sources"]


def test_the_largest_micro_batch_that_fits_holds_no_more_than_its_budget_on_the_device(torch_cuda):
    # The cap is on the caching allocator; the CUDA context lies outside it. A trial at the wall
    # must still fit the budget as NVML sees the device, or a wall found for "24GiB" would not
    # fit a 24 GiB card.
    budget_bytes = 2 * GIB
    fitted = None
    with TrialWorker("synthetic-images", "torch", memory_budget=budget_bytes, device="cuda:0") as worker:
        for micro in (64, 128, 256, 512, 1024, 2048):
            result = worker.run(TrialConfig(micro), TrialBudget(train_samples=2048))
            if result.status != "ok":
                assert result.status == "oom", result.error
                break
            fitted = result
    assert fitted is not None and fitted.config.micro_batch_size >= 128, "even micro-batch 64 did not fit"
    overhead = fitted.device_overhead_bytes
    print(
        f"wall at micro-batch {fitted.config.micro_batch_size}: allocator {fitted.allocator_peak_bytes / MIB:.0f} MiB "
        f"+ outside {overhead / MIB:.0f} MiB; NVML saw {_added_on_device(fitted) / MIB:.0f} MiB added"
    )
    assert 50 * MIB < overhead < CONTEXT_ALLOWANCE  # the CUDA context was measured
    assert fitted.peak_memory_bytes == fitted.allocator_peak_bytes + overhead <= budget_bytes
    assert fitted.allocator_peak_bytes > budget_bytes / 4  # the trial came near the wall
    assert _added_on_device(fitted) <= budget_bytes + READING_SLACK  # the device agrees, with its own reading
    assert _added_on_device(fitted) <= fitted.peak_memory_bytes + READING_SLACK  # and nothing went uncounted
    assert "CUDA context" in fitted.memory_budget_covers


def test_the_allocator_peak_agrees_with_nvml(torch_cuda):
    result = run_trial(
        "synthetic-images",
        "torch",
        TrialConfig(256),
        memory_budget="8GiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=16384),  # a second or more of training: several samples
    )
    assert result.status == "ok", result.error
    telemetry = result.telemetry
    assert telemetry["sources"] == ["psutil", "nvml"] and telemetry["samples"] >= 2, telemetry
    # NVML reads the whole device: the trial's share is what it added to the reading at its start.
    added = _added_on_device(result)
    reserved = result.allocator_peak_bytes  # the caching allocator's reserved peak
    print(
        f"allocator reserved peak {reserved / MIB:.0f} MiB, outside it {result.device_overhead_bytes / MIB:.0f} MiB, "
        f"NVML added {added / MIB:.0f} MiB, mean GPU utilization {telemetry.get('mean_gpu_utilization')}%, "
        f"power {telemetry.get('mean_power_watts')} W"
    )
    assert reserved > 100 * MIB
    assert added >= reserved - READING_SLACK  # NVML sees at least what the allocator holds (it keeps its cache)
    assert added - reserved <= CONTEXT_ALLOWANCE  # and beyond it only the context
    assert abs(result.peak_memory_bytes - added) <= 2 * READING_SLACK  # what is counted is what the device held
    assert 0 <= telemetry["mean_gpu_utilization"] <= 100 and telemetry["max_gpu_utilization"] > 0


def test_mixed_precision_with_accumulation_trains_on_cuda(torch_cuda):
    budget = TrialBudget(train_samples=2048, mixed_precision=True, seed=3)
    results = {
        accumulation: run_trial(
            "synthetic-images",
            "torch",
            TrialConfig(128 // accumulation, accumulation),
            memory_budget="4GiB",
            device="cuda:0",
            budget=budget,
        )
        for accumulation in (1, 4)
    }
    for result in results.values():
        assert result.status == "ok", result.error
        assert math.isfinite(result.val_loss) and result.samples_trained >= 2048
        assert result.peak_memory_bytes <= 4 * GIB
    # The same windows of 128 in float16: four micro-batches of 32 train as one of 128.
    assert results[4].val_loss == pytest.approx(results[1].val_loss, rel=0.1)


def test_autobatch_train_runs_on_cuda(torch_cuda, run_cli, tmp_path):
    done = run_cli(
        "train",
        "synthetic-images",
        "--backend",
        "torch",
        "--device",
        "cuda:0",
        "--micro-batch",
        "32",
        "--accumulation",
        "2",
        "--mixed-precision",
        "--memory-budget",
        "4GiB",
        "--output",
        str(tmp_path / "model.pt"),
        "--json",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["device"] == "cuda:0" and result["steps"] > 0 and math.isfinite(result["val_loss"])
    assert 0 < result["peak_memory_bytes"] <= 4 * GIB
    assert (tmp_path / "model.pt").stat().st_size > 0


def test_a_loader_that_initialised_cuda_gets_a_fresh_process_per_trial(torch_cuda):
    backend = "tests.fork_tasks:ReportingTorchBackend"
    budget = TrialBudget(train_samples=64, warmup_steps=0, min_timed_steps=1)
    for task, mode in (("tests.fork_tasks:initialises_cuda", "fresh"), ("tests.fork_tasks:asks_for_cuda", "fork")):
        with TrialWorker(task, backend, memory_budget="2GiB", device="cuda:0") as worker:
            results = [worker.run(TrialConfig(8), budget) for _ in range(2)]
        assert [result.status for result in results] == ["ok", "ok"], [result.error for result in results]
        assert [result.extras["worker_mode"] for result in results] == [mode, mode], task


def test_a_share_budget_is_a_share_of_the_gpu_total(torch_cuda):
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    resolved = MemoryBudget.parse("50%").resolve("cuda:0")
    assert resolved == pytest.approx(0.5 * total, rel=0.03)  # NVML's total and CUDA's differ by reserved pages


def test_tensorflow_memory_limit_makes_a_large_micro_batch_run_out_of_memory(tensorflow_gpu):
    big = run_trial(
        "synthetic-images",
        "tensorflow",
        TrialConfig(2048),
        memory_budget="2GiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=2048),
    )
    assert big.status == "oom", big.error
    small = run_trial(
        "synthetic-images",
        "tensorflow",
        TrialConfig(16),
        memory_budget="2GiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=512),
    )
    assert small.status == "ok", small.error
    assert small.device_overhead_bytes is not None and small.device_overhead_bytes > 50 * MIB
    assert small.peak_memory_bytes == small.allocator_peak_bytes + small.device_overhead_bytes <= 2 * GIB


def test_a_tensorflow_trial_without_a_budget_takes_what_it_uses_not_the_whole_gpu(tensorflow_gpu):
    result = run_trial(
        "synthetic-images", "tensorflow", TrialConfig(16), device="cuda:0", budget=TrialBudget(train_samples=512)
    )
    assert result.status == "ok", result.error
    total = result.telemetry["device_memory_total_bytes"]
    # Without memory growth TensorFlow maps nearly all of the GPU at its first op.
    assert _added_on_device(result) < 0.5 * total, (_added_on_device(result), total)


def test_a_short_tune_on_cuda_uses_the_default_budget_and_advises(torch_cuda, run_cli):
    done = run_cli(
        "tune",
        "synthetic-images",
        "--backend",
        "torch",
        "--device",
        "cuda:0",
        "--trials",
        "3",
        "--samples",
        "1024",
        "--storage",
        "sqlite:///gpu.db",
        "--study-name",
        "gpu",
        "--json",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("memory budget ")]
    assert "90% of cuda:0's total memory" in line and "the default" in line
    result = json.loads(done.stdout)
    assert result["recommended"] is not None
    telemetry = result["recommended"]["telemetry"]
    assert "mean_gpu_utilization" in telemetry and telemetry["peak_device_memory_bytes"] > 0
    print(json.dumps(result["recommended"], indent=2))


def test_devices_sees_the_gpu(run_cli):
    done = run_cli("devices", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["nvml"]["available"] and report["nvml"]["driver_version"]
    assert report["nvml"]["cuda_devices"], report["nvml"].get("cuda_devices_error")
    assert report["default_device"] == "cuda:0" and report["gpu_usable"] and report["why_no_gpu"] is None
    gpu = next(device for device in report["devices"] if device["device"] == "cuda:0")
    assert gpu["usable"] and gpu["memory_bytes"] > GIB
    if has_cuda():
        assert "torch" in gpu["frameworks"]
    elif REQUIRE_GPU:
        pytest.fail("NVML sees a GPU, but PyTorch cannot use it")
