"""The GPU paths' logic, checked on the CPU: what a GPU run will do, with the GPU faked.

- A child configures the device before the task loads, caps it before the trial, and fails a
  trial (or a training run) with the reason when a setting cannot be applied.
- What a process holds outside the capped allocator (the CUDA context, kernels, workspaces)
  counts against the budget: the allocator is capped at the budget less it, and a trial whose
  sum exceeds the budget is out of memory.
- TensorFlow gets its memory limit, or memory growth, before anything initialises it.
- NVML's GPUs are matched to CUDA's by PCI bus id and UUID, never by NVML's index; a MIG slice
  reads as the slice.

The real thing runs in test_gpu.py on a GPU.
"""

import os
from types import SimpleNamespace

import pytest

import autobatch.core.devices
from autobatch import TrialConfig, run_trial, train
from autobatch.core.devices import DeviceMemoryMeter, cuda_total_memory_bytes, nvml_handle, process_device_memory_bytes
from autobatch.errors import AutobatchError, InvalidParameterError
from tests.fake_nvml import FakeGpu, FakeMig, FakeNvml

MIB = 2**20
GIB = 2**30
TASK = "tests.gpu_paths_tasks:recording_task"


def _backend(name: str) -> str:
    return f"tests.gpu_paths_tasks:{name}"


# --- order: configure the device, load the task, cap, run --------------------------------------


def test_a_trial_child_configures_the_device_before_the_task_loads_and_caps_before_the_trial():
    result = run_trial(TASK, _backend("RecordingBackend"), TrialConfig(8), memory_budget="2GiB", device="fake:0")
    assert result.status == "ok", result.error
    assert result.extras["calls"] == ["configure_device", "load_task", "apply_memory_cap", "run_trial"]


def test_a_training_child_configures_and_caps_the_device_before_the_task_loads():
    with pytest.raises(AutobatchError, match="stopped here") as caught:
        train(TASK, _backend("RecordingBackend"), micro_batch_size=8, memory_budget="2GiB", device="fake:0")
    assert "['configure_device', 'apply_memory_cap', 'load_task', 'training_session']" in str(caught.value)


def test_a_device_setting_that_cannot_be_applied_fails_the_trial_with_its_reason():
    result = run_trial(TASK, _backend("UnconfigurableBackend"), TrialConfig(8), memory_budget="2GiB", device="fake:0")
    assert result.status == "error"
    assert "DeviceConfigurationError: TensorFlow could not apply memory growth to fake:0" in result.error
    assert "cannot be modified after being initialized" in result.error


def test_a_device_setting_that_cannot_be_applied_stops_training_with_its_reason():
    with pytest.raises(AutobatchError, match="could not apply memory growth to fake:0: Physical devices cannot"):
        train(TASK, _backend("UnconfigurableBackend"), micro_batch_size=8, memory_budget="2GiB", device="fake:0")


# --- the memory outside the allocator counts against the budget -----------------------------------


def test_memory_outside_the_allocator_counts_against_the_budget():
    # The allocator peaked at 600 MiB; the process held 500 MiB more outside it.
    backend = _backend("ContextHoldingBackend")
    fits = run_trial(TASK, backend, TrialConfig(8), memory_budget="2GiB", device="fake:0")
    assert fits.status == "ok", fits.error
    assert (fits.allocator_peak_bytes, fits.device_overhead_bytes) == (600 * MIB, 500 * MIB)
    assert fits.peak_memory_bytes == 1100 * MIB
    assert fits.baseline_memory_bytes == 500 * MIB  # counted as the peak is
    assert "outside that allocator" in fits.memory_budget_covers

    # A search stores both parts as user attrs, which the dashboard shows.
    from autobatch.search.results import trial_outcome

    settings = {"backend": "fake", "device": "fake:0"}
    attrs, _, constraint, _ = trial_outcome(TrialConfig(8), fits, 0, 2 * GIB, settings)
    assert (attrs["allocator_peak_bytes"], attrs["device_overhead_bytes"]) == (600 * MIB, 500 * MIB)
    assert attrs["memory_budget_covers"] == fits.memory_budget_covers
    assert constraint == pytest.approx(1100 / 2048 - 1)

    over = run_trial(TASK, backend, TrialConfig(8), memory_budget="1GiB", device="fake:0")
    assert (over.status, over.oom_phase) == ("oom", "train")
    assert over.error == (
        "over the memory budget: the trial held 1.07 GiB on fake:0 (allocator peak 600.00 MiB + 500.00 MiB outside "
        "it: CUDA context, kernels and library workspaces), more than the budget of 1.00 GiB"
    )


def test_the_note_and_the_result_say_what_the_budget_covers():
    from autobatch.search.note import study_note

    def note(backend: str, device: str) -> str:
        settings = {"task": "t", "backend": backend, "device": device}
        study = SimpleNamespace(user_attrs={"autobatch": settings}, get_trials=lambda **kwargs: [])
        counts = dict(n_trials=0, n_oom_trials=0, n_failed_trials=0)
        result = SimpleNamespace(
            recommended=None, probe={}, memory_budget_bytes=GIB, max_micro_batch=8, pareto_front=[], costs={}, **counts
        )
        return study_note(study, result)

    assert "On cuda:0 the budget covers PyTorch's caching allocator (its peak counted as bytes reserved" in note(
        "torch", "cuda:0"
    )
    assert "TensorFlow's GPU allocator (a logical device whose memory_limit is the budget" in note(
        "tensorflow", "cuda:0"
    )
    assert "the CUDA context, kernels and library workspaces" in note("tensorflow", "cuda:0")
    assert "On cpu the budget covers the whole trial process's data segment (RLIMIT_DATA)" in note("torch", "cpu")


# --- PyTorch: the allocator's cap leaves room for the CUDA context -------------------------------


class FakeCuda:
    """torch.cuda on one fake GPU: its context takes ``context_bytes`` when CUDA starts."""

    def __init__(self, monkeypatch, nvml: FakeNvml, gpu: FakeGpu, context_bytes: int, listed: bool):
        import torch

        self.nvml, self.gpu, self.context_bytes, self.listed = nvml, gpu, context_bytes, listed
        self.initialized = False
        self.reserved = 0
        self.fractions: list[tuple[float, int]] = []
        for name, function in {
            "is_initialized": lambda: self.initialized,
            "mem_get_info": self.mem_get_info,
            "memory_reserved": lambda device=None: self.reserved,
            "set_per_process_memory_fraction": lambda fraction, device=None: self.fractions.append((fraction, device)),
        }.items():
            monkeypatch.setattr(torch.cuda, name, function)

    def mem_get_info(self, device=None):
        if not self.initialized:  # CUDA starts: the context takes its memory
            self.initialized = True
            self.hold(self.context_bytes)
        return self.gpu.total - self.gpu.used, self.gpu.total

    def hold(self, nbytes: int) -> None:
        """This process takes ``nbytes`` more on the GPU (NVML lists it only if ``listed``)."""
        self.gpu.used += nbytes
        if self.listed:
            held = dict(self.gpu.processes).get(os.getpid()) or 0
            self.nvml.this_process_uses(self.gpu, held + nbytes)


@pytest.fixture
def fake_nvml(monkeypatch):
    return FakeNvml(monkeypatch, pytest.importorskip("pynvml"))


@pytest.mark.parametrize("listed", [True, False], ids=["nvml-lists-the-process", "in-a-container"])
def test_the_cuda_allocator_is_capped_at_the_budget_less_the_cuda_context(fake_nvml, monkeypatch, listed):
    pytest.importorskip("torch")
    from autobatch.backends.torch.backend import TorchBackend

    gpu = fake_nvml.gpus[0]
    gpu.used = 3 * GIB  # another process's
    cuda = FakeCuda(monkeypatch, fake_nvml, gpu, context_bytes=512 * MIB, listed=listed)
    backend = TorchBackend()
    backend.configure_device("cuda:0", 8 * GIB)  # in the child, before the task loads: NVML alone
    assert not cuda.initialized
    backend.apply_memory_cap(8 * GIB, "cuda:0")
    assert cuda.fractions == [pytest.approx(((8 * GIB - 512 * MIB) / (80 * GIB), 0))]
    # Training: the allocator reserves 2 GiB, and cuDNN's kernels and workspaces take 300 MiB outside it.
    cuda.reserved = 2 * GIB
    cuda.hold(2 * GIB + 300 * MIB)
    assert backend.device_overhead_bytes("cuda:0") == 812 * MIB


def test_a_budget_below_the_cuda_context_is_refused_by_name(fake_nvml, monkeypatch):
    pytest.importorskip("torch")
    from autobatch.backends.torch.backend import TorchBackend

    cuda = FakeCuda(monkeypatch, fake_nvml, fake_nvml.gpus[0], context_bytes=512 * MIB, listed=True)
    backend = TorchBackend()
    with pytest.raises(InvalidParameterError, match="must exceed the 512.00 MiB this process holds on cuda:0"):
        backend.apply_memory_cap(256 * MIB, "cuda:0")
    assert cuda.fractions == []


# --- TensorFlow: memory limit or growth, before anything initialises it ---------------------------


class FakeTensorFlowGpu:
    """tf.config with one GPU: settings are refused once ``initialised``, as TensorFlow refuses them."""

    def __init__(self, monkeypatch, tf):
        self.gpu = SimpleNamespace(name="/physical_device:GPU:0", device_type="GPU")
        self.initialised = False
        self.calls: list[tuple] = []
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [self.gpu] if kind == "GPU" else [])
        monkeypatch.setattr(tf.config, "set_logical_device_configuration", self.set_logical_device_configuration)
        monkeypatch.setattr(tf.config.experimental, "set_memory_growth", self.set_memory_growth)

    def set_logical_device_configuration(self, device, logical):
        if self.initialised:
            raise RuntimeError("Virtual devices cannot be modified after being initialized")
        self.calls.append(("memory_limit", logical[0].memory_limit))

    def set_memory_growth(self, device, enable):
        if self.initialised:
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        self.calls.append(("growth", enable))


@pytest.fixture
def tensorflow_gpu(monkeypatch, fake_nvml):
    pytest.importorskip("tensorflow")
    from autobatch.backends.tensorflow._framework import tf
    from autobatch.backends.tensorflow.backend import TensorFlowBackend

    return TensorFlowBackend(), FakeTensorFlowGpu(monkeypatch, tf)


def test_tensorflow_gets_its_memory_limit_or_growth_once_before_the_task_loads(tensorflow_gpu):
    backend, gpu = tensorflow_gpu
    backend.configure_device("cuda:0", 3 * GIB)
    backend.apply_memory_cap(3 * GIB, "cuda:0")  # in the trial: set already
    assert gpu.calls == [("memory_limit", 3072)]

    gpu.calls.clear()
    backend = type(backend)()
    backend.configure_device("cuda:0", None)
    with backend.trial_scope("cuda:0"):
        pass
    assert gpu.calls == [("growth", True)]


def test_tensorflow_initialised_before_its_memory_growth_fails_loudly(tensorflow_gpu):
    backend, gpu = tensorflow_gpu
    gpu.initialised = True  # a device query (reset_memory_stats) or an op ran first
    with pytest.raises(AutobatchError, match="could not apply memory growth to cuda:0: Physical devices cannot"):
        with backend.trial_scope("cuda:0"):
            pass
    with pytest.raises(AutobatchError, match="could not apply a memory limit of 1024 MiB to cuda:0: Virtual"):
        backend.apply_memory_cap(GIB, "cuda:0")


def test_tensorflow_counts_what_lies_outside_its_memory_limit(tensorflow_gpu, fake_nvml):
    backend, _ = tensorflow_gpu
    backend.configure_device("cuda:0", 3 * GIB)
    fake_nvml.this_process_uses(fake_nvml.gpus[0], 3 * GIB + 700 * MIB)  # the pool, and the context beside it
    assert backend.device_overhead_bytes("cuda:0") == 700 * MIB


# --- NVML's GPUs are CUDA's by PCI bus id and UUID ------------------------------------------------


def _gpus(fake_nvml, *specs) -> list[FakeGpu]:
    fake_nvml.gpus[:] = [
        FakeGpu(name=name, uuid=f"GPU-{index}{index}{index}", bus=bus, total=total * GIB)
        for index, (name, bus, total) in enumerate(specs)
    ]
    return fake_nvml.gpus


def test_cuda_numbers_gpus_by_pci_bus_not_by_nvml_index(fake_nvml, monkeypatch):
    _gpus(fake_nvml, ("A100", 0x81, 40), ("A100", 0x3B, 80))
    assert cuda_total_memory_bytes("cuda:0") == 80 * GIB  # the GPU on the lower bus, NVML's index 1
    assert cuda_total_memory_bytes("cuda:1") == 40 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # CUDA's index, not NVML's
    assert cuda_total_memory_bytes("cuda:0") == 40 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-000")  # a unique prefix of a UUID
    assert cuda_total_memory_bytes("cuda:0") == 40 * GIB
    with pytest.raises(AutobatchError, match="cuda:1 is not visible: CUDA_VISIBLE_DEVICES='GPU-000' lists 1"):
        nvml_handle("cuda:1")


def test_gpus_of_different_models_need_an_order_nvml_can_repeat(fake_nvml, monkeypatch):
    monkeypatch.setattr(autobatch.core.devices, "_torch_total_memory_bytes", lambda device: (None, "not asked"))
    _gpus(fake_nvml, ("H100", 0x81, 80), ("T4", 0x3B, 16))
    with pytest.raises(AutobatchError, match="set CUDA_DEVICE_ORDER=PCI_BUS_ID, or list GPU UUIDs"):
        cuda_total_memory_bytes("cuda:0")  # FASTEST_FIRST: CUDA's guess
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert cuda_total_memory_bytes("cuda:0") == 16 * GIB
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-000,GPU-111")
    assert [cuda_total_memory_bytes(f"cuda:{i}") for i in (0, 1)] == [80 * GIB, 16 * GIB]


def test_a_mig_slice_reads_as_the_slice_not_the_whole_gpu(fake_nvml, monkeypatch):
    [gpu] = _gpus(fake_nvml, ("A100", 0x3B, 80))
    gpu.migs = [FakeMig("MIG-aaaa", 1, 0, total=10 * GIB), FakeMig("MIG-bbbb", 2, 0, total=20 * GIB)]
    assert cuda_total_memory_bytes("cuda:0") == 10 * GIB  # CUDA uses a MIG device of a GPU in MIG mode
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbb")
    assert cuda_total_memory_bytes("cuda:0") == 20 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-GPU-000/2/0")  # the older form: GPU UUID/instance/compute
    assert cuda_total_memory_bytes("cuda:0") == 20 * GIB


def test_this_process_is_measured_by_its_pid_or_else_by_what_the_device_gained(fake_nvml):
    [gpu] = _gpus(fake_nvml, ("A100", 0x3B, 80))
    gpu.used = 5 * GIB  # other processes
    meter = DeviceMemoryMeter("cuda:0")
    gpu.used += 1 * GIB
    assert process_device_memory_bytes("cuda:0") is None  # not listed (a container's own PID namespace)
    assert meter.process_bytes() == 1 * GIB and meter.outside_bytes(768 * MIB) == 256 * MIB
    fake_nvml.this_process_uses(gpu, 1536 * MIB)  # listed: NVML's own figure wins
    assert meter.process_bytes() == 1536 * MIB


def test_devices_report_lists_the_gpus_as_cuda_numbers_them(fake_nvml, monkeypatch):
    from autobatch.report.devices import device_report

    _gpus(fake_nvml, ("A100", 0x81, 40), ("A100", 0x3B, 80))
    gpus = [device for device in device_report(frameworks=False)["devices"] if device["device"] != "cpu"]
    assert [(device["device"], device["memory_bytes"]) for device in gpus] == [
        ("cuda:0", 80 * GIB),
        ("cuda:1", 40 * GIB),
    ]


# --- make test-gpu: a GPU that no framework can use fails the run --------------------------------


@pytest.mark.slow
def test_under_make_test_gpu_a_gpu_that_pytorch_cannot_use_fails_instead_of_skipping():
    import subprocess
    import sys

    pytest.importorskip("pynvml")
    from tests.conftest import ROOT, has_cuda

    if has_cuda():
        pytest.skip("PyTorch can use a GPU here")

    def run_gpu_test(**env: str) -> subprocess.CompletedProcess:
        command = ["-m", "pytest", "-q", "-p", "tests.nvml_sees_a_gpu", "tests/test_gpu.py", "-k", "share_budget"]
        return subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}
        )

    required = run_gpu_test(AUTOBATCH_REQUIRE_GPU="1")
    assert required.returncode == 1 and "1 error" in required.stdout, required.stdout[-2000:]  # a fixture failed
    assert "NVML sees a GPU, but PyTorch cannot use it" in required.stdout
    optional = run_gpu_test(AUTOBATCH_REQUIRE_GPU="0")
    assert optional.returncode == 0 and "1 skipped" in optional.stdout, optional.stdout[-2000:]
