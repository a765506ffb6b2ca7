"""A fake NVIDIA driver: the pynvml functions autobatch calls, answered from GPUs a test describes.

NVML's indices are deliberately its own (a test may list GPUs out of PCI bus order), MIG
devices have their own UUIDs, memory and instance ids, and processes are listed per device
with the memory NVML would report for them (``None`` as on a MIG slice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

GIB = 2**30


@dataclass(eq=False)
class FakeMig:
    uuid: str
    gpu_instance: int
    compute_instance: int
    total: int
    used: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)


@dataclass(eq=False)
class FakeGpu:
    name: str = "Fake GPU"
    uuid: str = "GPU-0a1b2c3d-0000-0000-0000-000000000000"
    bus: int = 0
    total: int = 80 * GIB
    used: int = 0
    migs: list[FakeMig] = field(default_factory=list)
    processes: list[tuple[int, int | None]] = field(default_factory=list)


class FakeNvml:
    """Patches ``pynvml`` (the real module) to answer from ``gpus``, listed in NVML's index order."""

    def __init__(self, monkeypatch, pynvml, gpus: list[FakeGpu] | None = None):
        self.pynvml = pynvml
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.gpu = self.memory = 0  # utilization, %
        self.milliwatts = 0
        self.clock = 0
        self.power_supported = True
        self.handles_read: list = []  # the handles whose memory was read, in order
        patches = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": lambda index: self.gpus[index],
            "nvmlDeviceGetHandleByUUID": self._by_uuid,
            "nvmlDeviceGetName": lambda handle: handle.name.encode() if isinstance(handle, FakeGpu) else b"MIG 1g",
            "nvmlDeviceGetUUID": lambda handle: handle.uuid,
            "nvmlDeviceGetPciInfo": lambda handle: SimpleNamespace(domain=0, bus=handle.bus, device=0),
            "nvmlDeviceGetMemoryInfo": self._memory,
            "nvmlDeviceGetMigMode": self._mig_mode,
            "nvmlDeviceGetMaxMigDeviceCount": lambda handle: 7,
            "nvmlDeviceGetMigDeviceHandleByIndex": self._mig_by_index,
            "nvmlDeviceGetGpuInstanceId": lambda handle: handle.gpu_instance,
            "nvmlDeviceGetComputeInstanceId": lambda handle: handle.compute_instance,
            "nvmlDeviceGetComputeRunningProcesses": lambda handle: [
                SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes
            ],
            "nvmlDeviceGetUtilizationRates": lambda handle: SimpleNamespace(gpu=self.gpu, memory=self.memory),
            "nvmlDeviceGetPowerUsage": self._power,
            "nvmlDeviceGetClockInfo": lambda handle, clock: self.clock,
        }
        for name, function in patches.items():
            monkeypatch.setattr(pynvml, name, function)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def set(self, used_gib, gpu, memory, watts, clock):
        """The first GPU's readings."""
        self.gpus[0].used = int(used_gib * GIB)
        self.gpu, self.memory, self.milliwatts, self.clock = gpu, memory, watts * 1000, clock

    def this_process_uses(self, handle, used: int | None) -> None:
        """NVML lists this test's process on ``handle`` as holding ``used`` bytes."""
        handle.processes = [(pid, value) for pid, value in handle.processes if pid != os.getpid()]
        handle.processes.append((os.getpid(), used))

    def _error(self, code_name: str):
        return self.pynvml.NVMLError(getattr(self.pynvml, code_name))

    def _by_uuid(self, uuid):
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise self._error("NVML_ERROR_NOT_FOUND")

    def _memory(self, handle):
        self.handles_read.append(handle)
        return SimpleNamespace(total=handle.total, used=handle.used, free=handle.total - handle.used)

    def _mig_mode(self, handle):
        if not isinstance(handle, FakeGpu):
            raise self._error("NVML_ERROR_NOT_SUPPORTED")
        mode = 1 if handle.migs else 0
        return [mode, mode]

    def _mig_by_index(self, handle, index):
        if index < len(handle.migs):
            return handle.migs[index]
        raise self._error("NVML_ERROR_NOT_FOUND")

    def _power(self, handle):
        if not self.power_supported:
            raise self._error("NVML_ERROR_NOT_SUPPORTED")
        return self.milliwatts
