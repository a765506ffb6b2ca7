"""Telemetry: NVML readings summarised right (fake NVML), the host sampled on the CPU, devices explained."""

import json
import os
from types import SimpleNamespace

import pytest

import autobatch.core.devices
from autobatch import TrialBudget, TrialConfig, TrialResult, run_trial
from autobatch.core.memory import MemoryBudget, describe_budget, device_memory_bytes
from autobatch.process.telemetry import TelemetrySampler, advice, telemetry_attrs
from tests.fake_nvml import FakeGpu, FakeNvml

SYNTHETIC = dict(task="tests.synthetic_backend:workload", backend="tests.synthetic_backend:SyntheticBackend")
MIB = 2**20
GIB = 2**30


@pytest.fixture
def fake_nvml(monkeypatch):
    pynvml = pytest.importorskip("pynvml")
    return FakeNvml(monkeypatch, pynvml)


def test_fake_nvml_readings_give_the_right_summary(fake_nvml):
    sampler = TelemetrySampler("cuda:0", interval=3600)  # no background sample: the test takes them
    fake_nvml.set(used_gib=1, gpu=0, memory=0, watts=60, clock=300)
    sampler.start()  # setup: before the trial touched the GPU
    sampler.phase = "train"
    for used, gpu, memory, watts, clock in [(10, 40, 20, 200, 1500), (30, 60, 30, 300, 1700), (20, 80, 40, 400, 1900)]:
        fake_nvml.set(used, gpu, memory, watts, clock)
        sampler.sample()
    sampler.phase = "eval"
    fake_nvml.set(used_gib=25, gpu=10, memory=5, watts=100, clock=1000)
    summary = sampler.stop()

    assert summary["sources"] == ["psutil", "nvml"] and summary["samples"] == 5
    assert summary["means_over"] == "train"
    assert summary["device_name"] == "Fake GPU" and summary["device_memory_total_bytes"] == 80 * GIB
    assert summary["peak_device_memory_bytes"] == 30 * GIB  # over the whole trial
    assert summary["device_memory_at_start_bytes"] == 1 * GIB
    assert summary["mean_gpu_utilization"] == 60 and summary["max_gpu_utilization"] == 80  # means: training only
    assert summary["mean_memory_utilization"] == 30 and summary["max_memory_utilization"] == 40
    assert summary["mean_power_watts"] == 300 and summary["max_power_watts"] == 400
    assert summary["mean_sm_clock_mhz"] == 1700 and summary["max_sm_clock_mhz"] == 1900
    assert summary["peak_rss_bytes"] > 10 * MIB and summary["cpu_cores"] >= 1
    assert "notes" not in summary
    assert sampler.stop() is summary  # stopping twice is harmless

    attrs = telemetry_attrs(summary)
    assert attrs["peak_device_memory_bytes"] == 30 * GIB and attrs["mean_gpu_utilization"] == 60
    assert attrs["telemetry_samples"] == 5 and json.dumps(attrs)


def test_an_unsupported_reading_is_noted_once_and_skipped(fake_nvml):
    fake_nvml.power_supported = False
    sampler = TelemetrySampler("cuda:0", interval=3600).start()
    fake_nvml.set(used_gib=2, gpu=50, memory=10, watts=0, clock=1200)
    for _ in range(5):
        sampler.sample()
    summary = sampler.stop()
    assert summary["samples"] == 7 and summary["max_gpu_utilization"] == 50
    assert "mean_power_watts" not in summary
    assert len(summary["notes"]) == 1 and "power" in summary["notes"][0]


@pytest.mark.parametrize("visible, expected", [("3", 2), ("GPU-0a1b, 2", 0)])
def test_nvml_reads_the_gpu_that_cuda_visible_devices_names(fake_nvml, monkeypatch, visible, expected):
    # NVML lists the GPUs out of PCI bus order; CUDA (and CUDA_VISIBLE_DEVICES's integers) go by it.
    fake_nvml.gpus[:] = [FakeGpu(uuid=f"GPU-{i}{i}", bus=bus) for i, bus in enumerate((0x81, 0x3B, 0xC1, 0x41))]
    fake_nvml.gpus[0].uuid = "GPU-0a1b2c"  # CUDA takes a unique prefix of a UUID
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    TelemetrySampler("cuda:0", interval=3600).start().stop()
    assert fake_nvml.handles_read[0] is fake_nvml.gpus[expected]


def test_devices_lists_what_nvml_sees_and_budgets_are_shares_of_it(fake_nvml, monkeypatch):
    from autobatch.report.devices import device_report, devices_text

    pynvml = fake_nvml.pynvml
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54.15")
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion", lambda: 12040)
    fake_nvml.set(used_gib=2, gpu=7, memory=1, watts=70, clock=1980)
    report = device_report(frameworks=False)
    assert report["default_device"] == "cuda:0" and report["gpu_usable"] and report["why_no_gpu"] is None
    assert report["nvml"]["driver_version"] == "550.54.15" and report["nvml"]["cuda_driver_version"] == "12.4"
    gpu = next(device for device in report["devices"] if device["device"] == "cuda:0")
    assert gpu["memory_bytes"] == 80 * GIB and gpu["default_budget_bytes"] == int(0.9 * 80 * GIB)
    assert "GPU 0: Fake GPU, 80.00 GiB total, 2.00 GiB in use, 7% busy" in devices_text(report)
    assert MemoryBudget.parse("90%").resolve("cuda:0") == int(0.9 * 80 * GIB)


def test_without_a_driver_telemetry_says_so_once_and_samples_the_host(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    sampler = TelemetrySampler("cuda:0", interval=0.01).start()
    held = bytearray(64 * MIB)  # touched: resident
    for _ in range(3):
        sampler.sample()
    summary = sampler.stop()
    del held
    assert summary["sources"] == ["psutil"] and summary["samples"] >= 5
    assert summary["notes"] == [
        "GPU telemetry unavailable: no NVIDIA driver: NVML's library libnvidia-ml.so.1 was not found; "
        "the host alone is sampled"
    ]
    assert summary["peak_rss_bytes"] > 64 * MIB
    assert "peak_device_memory_bytes" not in summary


def test_advice_reads_the_utilization():
    starved = {"mean_gpu_utilization": 35, "max_gpu_utilization": 60, "samples": 40}
    [tip] = advice(starved, device="cuda:0", backend="torch", num_workers=0)
    assert "35% utilization" in tip and "input pipeline" in tip and "Try --num-workers 4 (DataLoader" in tip
    [tip] = advice(starved, device="cuda:0", backend="tensorflow")
    assert "num_parallel_calls" in tip
    [tip] = advice({"mean_gpu_utilization": 97, "samples": 40}, device="cuda:0", backend="torch")
    assert "compute bound" in tip and "--mixed-precision" in tip
    [tip] = advice({"mean_cpu_percent": 50, "cpu_cores": 8, "samples": 40}, device="cpu", backend="torch")
    assert "0.5 of 8" in tip and "idle" in tip
    [tip] = advice({"mean_cpu_percent": 390, "cpu_cores": 4, "telemetry_samples": 40}, device="cpu")
    assert "saturated" in tip
    assert advice({"mean_cpu_percent": 50, "cpu_cores": 8, "samples": 2}, device="cpu") == []  # too short to tell
    assert advice({}, device="cpu") == [] and advice(None, device="cpu") == []


def test_the_cli_summary_and_the_note_carry_the_advice():
    from autobatch.search.note import study_note, summary_text

    settings = {"task": "t", "backend": "torch", "device": "cuda:0", "trial_budget": {"num_workers": 2}}
    recommended = {
        "trial_number": 3,
        "micro_batch_size": 64,
        "accumulation_steps": 1,
        "learning_rate": 1e-3,
        "effective_batch_size": 64,
        "throughput": 900.0,
        "val_loss": 0.5,
        "peak_memory_bytes": GIB,
        "telemetry": {"mean_gpu_utilization": 35.0, "telemetry_samples": 50},
    }
    study = SimpleNamespace(user_attrs={"autobatch": settings}, get_trials=lambda **kwargs: [])
    result = SimpleNamespace(
        study=study,
        study_name="s",
        storage="sqlite:///x.db",
        memory_budget_bytes=2 * GIB,
        max_micro_batch=128,
        n_trials=4,
        n_oom_trials=0,
        n_failed_trials=0,
        pareto_front=[recommended],
        recommended=recommended,
        probe={},
        costs={},
    )
    [line] = [line for line in summary_text(result).splitlines() if line.startswith("Advice:")]
    assert "35% utilization" in line and "more than --num-workers 2" in line
    assert "## Advice from telemetry" in study_note(study, result)


def test_a_search_trial_stores_its_telemetry_as_user_attrs():
    from autobatch.search.results import trial_outcome as _trial_outcome

    result = TrialResult(
        "ok",
        TrialConfig(8),
        samples_per_second=10.0,
        val_loss=0.5,
        peak_memory_bytes=MIB,
        telemetry={
            "samples": 12,
            "peak_device_memory_bytes": 3 * GIB,
            "mean_gpu_utilization": 42.5,
            "peak_rss_bytes": 500 * MIB,
            "notes": ["NVML cannot read power on this GPU"],
        },
    )
    attrs, *_ = _trial_outcome(result.config, result, MIB, GIB, {"backend": "torch", "device": "cuda:0"})
    assert attrs["peak_device_memory_bytes"] == 3 * GIB and attrs["mean_gpu_utilization"] == 42.5
    assert attrs["peak_rss_bytes"] == 500 * MIB and attrs["telemetry_samples"] == 12
    assert "power" in attrs["telemetry_note"]


def test_a_result_from_before_telemetry_still_loads():
    data = TrialResult("ok", TrialConfig(4)).to_dict()
    del data["telemetry"]
    assert TrialResult.from_dict(data).telemetry == {}


def test_a_real_cpu_trial_reports_rss_based_telemetry():
    result = run_trial(config=TrialConfig(64), memory_budget="1GiB", **SYNTHETIC)
    assert result.status == "ok", result.error
    telemetry = result.telemetry
    assert telemetry["sources"] == ["psutil"] and telemetry["samples"] >= 2
    assert 20 * MIB < telemetry["peak_rss_bytes"] < GIB
    assert telemetry["cpu_cores"] >= 1 and telemetry["mean_cpu_percent"] >= 0
    assert "notes" not in telemetry  # on the CPU nothing is missing


@pytest.mark.slow
def test_a_real_torch_trial_samples_while_it_trains():
    pytest.importorskip("torch")
    budget = TrialBudget(train_samples=8192)
    result = run_trial("digits-mlp", "torch", TrialConfig(16), memory_budget="2GiB", budget=budget)
    assert result.status == "ok", result.error
    telemetry = result.telemetry
    assert telemetry["samples"] >= 3 and telemetry["means_over"] == "train"
    assert telemetry["mean_cpu_percent"] > 0
    # The sampled peak (the process and its children) is the resident peak, give or take a sample.
    assert telemetry["peak_rss_bytes"] <= result.peak_resident_bytes * 1.1


def test_a_failing_trial_still_stops_its_sampler_and_reports():
    result = run_trial("tests.tasks:factory_raises", SYNTHETIC["backend"], TrialConfig(4))
    assert result.status == "error" and "no data here" in result.error
    assert result.telemetry["samples"] >= 1


def test_telemetry_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("AUTOBATCH_TELEMETRY", "0")
    assert run_trial(config=TrialConfig(4), **SYNTHETIC).telemetry == {}


def test_a_share_budget_is_a_share_of_available_ram_on_the_cpu():
    resolved = MemoryBudget.parse("90%").resolve("cpu")
    assert resolved == pytest.approx(0.9 * device_memory_bytes("cpu"), rel=0.05)
    line = describe_budget(MemoryBudget.parse("90%"), "cpu", resolved, "the default on cpu")
    assert line.startswith("memory budget ") and "90% of the RAM available on cpu now" in line


def test_a_share_of_a_gpu_without_a_driver_is_a_clear_error(monkeypatch):
    from autobatch.errors import AutobatchError

    monkeypatch.setattr(autobatch.core.devices, "_torch_total_memory_bytes", lambda device: (None, "CPU-only build"))
    if autobatch.core.devices.cuda_device_count():
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(AutobatchError, match="total memory of cuda:0 is unknown .*CPU-only build.*absolute"):
        MemoryBudget.parse("90%").resolve("cuda:0")


def test_cli_trial_without_a_budget_runs_under_the_default_and_says_so(run_cli):
    done = run_cli("trial", SYNTHETIC["task"], "--backend", SYNTHETIC["backend"], "--micro-batch", "8", "--json")
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("memory budget ")]
    assert "the default on cpu, as no --memory-budget was given" in line
    result = json.loads(done.stdout)
    assert result["memory_budget_bytes"] > 0 and result["telemetry"]["samples"] >= 2


@pytest.mark.slow
def test_cli_devices_json_runs_here_and_says_why_there_is_no_gpu(run_cli):
    done = run_cli("devices", "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cpu = next(device for device in report["devices"] if device["device"] == "cpu")
    assert cpu["usable"] and cpu["memory_bytes"] > 0 and report["cpu"]["usable_cores"] >= 1
    assert cpu["default_budget_bytes"] == pytest.approx(0.9 * cpu["memory_bytes"], rel=0.01)
    if report["gpu_usable"]:
        assert report["nvml"]["available"] and report["default_device"] == "cuda:0"
        return
    why = report["why_no_gpu"]
    assert why and report["default_device"] == "cpu"
    if not report["nvml"]["available"]:
        assert report["nvml"]["error"] in why
    torch = report.get("torch", {})
    if torch.get("installed") and not torch.get("cuda_build"):
        assert "CPU-only build" in why
    tensorflow = report.get("tensorflow", {})
    if tensorflow.get("installed") and not tensorflow.get("built_with_cuda"):
        assert "built without CUDA" in why


def test_cli_devices_text_names_the_reasons(run_cli):
    done = run_cli("devices", "--no-frameworks", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "default device:" in done.stdout and "cpu" in done.stdout
    if "no usable GPU" in done.stdout:
        assert "- " in done.stdout.split("no usable GPU", 1)[1]


def test_importing_the_device_modules_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, autobatch.process.telemetry, autobatch.cli.devices, autobatch.report.devices, autobatch.core.devices;"
        "print([m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ)
    )
    assert done.stdout.strip() == "[]"
