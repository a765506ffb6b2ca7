"""The CUDA paths on a real NVIDIA GPU: caps that bite, NVML against the allocator, a short study.

Skipped without a GPU (CI has none). On a GPU machine: ``pytest -m gpu tests/test_gpu.py``.
"""

import json
import subprocess
import sys

import pytest

from autobatch import MemoryBudget, TrialBudget, TrialConfig, run_trial
from autobatch.core.devices import cuda_device_count
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


@pytest.fixture(scope="module")
def torch_cuda():
    if not has_cuda():
        pytest.skip("PyTorch has no CUDA here (a CPU-only build, or no usable GPU)")


@pytest.fixture(scope="module")
def tensorflow_gpu():
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import tensorflow as tf; "
        "print(len(tf.config.list_physical_devices('GPU')))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("importing TensorFlow took too long")
    if done.returncode != 0 or not done.stdout.strip().isdigit() or int(done.stdout.strip()) == 0:
        pytest.skip("TensorFlow sees no GPU here (tensorflow-cpu, or not installed)")


def test_a_micro_batch_over_the_cap_runs_out_of_cuda_memory(torch_cuda):
    # 2048 images of 3x64x64: one 16-channel activation alone is 512 MiB in float32.
    result = run_trial(
        "synthetic-images",
        "torch",
        TrialConfig(2048),
        memory_budget="256MiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=2048),
    )
    assert result.status == "oom" and result.oom_phase == "train", result.error
    assert "CUDA out of memory" in result.error
    assert result.memory_budget_bytes == 256 * MIB
    assert "nvml" in result.telemetry["sources"]


def test_a_small_micro_batch_fits_the_same_cap(torch_cuda):
    result = run_trial(
        "synthetic-images",
        "torch",
        TrialConfig(16),
        memory_budget="256MiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=512),
    )
    assert result.status == "ok", result.error
    assert 0 < result.peak_memory_bytes <= 256 * MIB
    assert result.device == "cuda:0" and result.samples_per_second > 0


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
    added = telemetry["peak_device_memory_bytes"] - telemetry["device_memory_at_start_bytes"]
    reserved = result.peak_memory_bytes  # the caching allocator's reserved peak
    print(
        f"allocator reserved peak {reserved / MIB:.0f} MiB, NVML added {added / MIB:.0f} MiB, "
        f"mean GPU utilization {telemetry.get('mean_gpu_utilization')}%, power {telemetry.get('mean_power_watts')} W"
    )
    assert reserved > 100 * MIB
    assert added >= reserved - 64 * MIB  # NVML sees at least what the allocator holds (it keeps its cache)
    assert added - reserved <= CONTEXT_ALLOWANCE  # and beyond it only the context
    assert 0 <= telemetry["mean_gpu_utilization"] <= 100 and telemetry["max_gpu_utilization"] > 0


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
        memory_budget="256MiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=2048),
    )
    assert big.status == "oom", big.error
    small = run_trial(
        "synthetic-images",
        "tensorflow",
        TrialConfig(16),
        memory_budget="256MiB",
        device="cuda:0",
        budget=TrialBudget(train_samples=512),
    )
    assert small.status == "ok", small.error
    assert small.peak_memory_bytes <= 256 * MIB


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
    assert report["default_device"] == "cuda:0" and report["gpu_usable"] and report["why_no_gpu"] is None
    gpu = next(device for device in report["devices"] if device["device"] == "cuda:0")
    assert gpu["usable"] and gpu["memory_bytes"] > GIB
    if has_cuda():
        assert "torch" in gpu["frameworks"]
