"""What devices the trials can run on, found without importing a framework.

The device facts that every stage may ask (the default device, a GPU's total memory, NVML's
handle for a CUDA device, what this process holds on it) and what NVML says of the driver and
each GPU, for ``autobatch devices``. NVML numbers GPUs its own way: a CUDA device is found by
PCI bus id or UUID (:func:`cuda_devices`), and a MIG slice by its own handle.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any

from autobatch.errors import AutobatchError


def cuda_device_count() -> int:
    """Number of NVIDIA GPUs NVML sees (0 when there is no driver or no device)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def default_device() -> str:
    """``cuda:0`` when NVML sees a GPU that ``CUDA_VISIBLE_DEVICES`` does not hide, else ``cpu``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible_cuda_ids(visible):
        return "cpu"  # "" or "-1": the user hid every GPU
    return "cuda:0" if cuda_device_count() > 0 else "cpu"


def visible_cuda_ids(visible: str) -> list[str]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` lists; CUDA stops at the first invalid entry (``-1``)."""
    ids = []
    for part in visible.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break
        ids.append(part)
    return ids


def cuda_total_memory_bytes(device: str) -> int:
    """Total memory of ``cuda:N``: NVML's figure, or PyTorch's (in a subprocess) where NVML fails.

    Honours ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs). Raises :class:`AutobatchError`
    saying why neither could tell.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:
        nvml_reason = nvml_error_text(error)
    else:
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(device)).total)
        except Exception as error:
            nvml_reason = nvml_error_text(error)
        finally:
            pynvml.nvmlShutdown()
    total, torch_reason = _torch_total_memory_bytes(device)
    if total is not None:
        return total
    raise AutobatchError(
        f"the total memory of {device} is unknown (NVML: {nvml_reason}; PyTorch: {torch_reason}); "
        "give an absolute memory budget such as '8GiB', or run on device 'cpu'"
    )


def cuda_index(device: str) -> int:
    """``N`` of ``cuda:N`` (0 for a bare ``cuda``)."""
    _, _, index = device.partition(":")
    return int(index) if index.strip().isdigit() else 0


def nvml_handle(device: str):
    """NVML's handle for ``cuda:N`` as CUDA numbers it in this process (NVML must be initialised).

    NVML's own indices need not match CUDA's (NVML says so), so a GPU is matched by PCI bus
    id or UUID, never by index: CUDA numbers the GPUs ``CUDA_VISIBLE_DEVICES`` lists, in its
    order (an integer there is CUDA's own index, a ``GPU-``/``MIG-`` UUID names one device),
    or all of them, ordered as ``CUDA_DEVICE_ORDER`` says. A GPU in MIG mode is used by CUDA
    as one of its MIG devices, whose handle (and memory) is returned, not the whole GPU's.
    Raises :class:`AutobatchError` when ``device`` is not visible or cannot be told apart.
    """
    import pynvml

    index = cuda_index(device)
    devices = cuda_devices(pynvml)
    if index >= len(devices):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f"CUDA_VISIBLE_DEVICES={visible!r} lists" if visible is not None else "NVML sees"
        raise AutobatchError(f"{device} is not visible: {where} {len(devices)} GPU(s)")
    return devices[index].handle


class CudaDevice:
    """One device as CUDA numbers it: NVML's handle (a MIG device's where CUDA uses one) and its GPU's NVML index."""

    def __init__(self, handle, nvml_index: int, mig: bool):
        self.handle = handle
        self.nvml_index = nvml_index
        self.mig = mig


def cuda_devices(pynvml) -> list[CudaDevice]:
    """The devices CUDA numbers 0, 1, ... in this process, found through NVML (initialised)."""
    gpus = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [_as_cuda_device(pynvml, gpus, gpu) for gpu in _in_cuda_order(pynvml, gpus)]
    devices: list[CudaDevice] = []
    ordered: list | None = None
    for entry in visible_cuda_ids(visible):
        if entry.isdigit():
            ordered = _in_cuda_order(pynvml, gpus) if ordered is None else ordered
            found = _as_cuda_device(pynvml, gpus, ordered[int(entry)]) if int(entry) < len(ordered) else None
        elif entry.upper().startswith("MIG-"):
            found = _mig_by_uuid(pynvml, gpus, entry)
        else:
            gpu = _by_uuid(pynvml, gpus, entry)
            found = _as_cuda_device(pynvml, gpus, gpu) if gpu is not None else None
        if found is None:
            break  # CUDA ignores an entry it cannot find, and every entry after it
        devices.append(found)
    return devices


def _in_cuda_order(pynvml, gpus: list) -> list:
    """NVML's GPUs in the order CUDA numbers them before ``CUDA_VISIBLE_DEVICES`` picks among them.

    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` orders by PCI bus id. CUDA's default, ``FASTEST_FIRST``,
    puts its guess of the fastest first; among GPUs of one model that is PCI bus order. With
    GPUs of different models the order is CUDA's guess, which NVML cannot repeat: refused.
    """
    by_bus = sorted(gpus, key=lambda gpu: _pci_key(pynvml, gpu))
    if os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").strip().upper() == "PCI_BUS_ID":
        return by_bus
    names = {_text(_try(pynvml.nvmlDeviceGetName, gpu)) for gpu in gpus}
    if len(names) > 1:
        raise AutobatchError(
            f"cannot tell which NVML GPU CUDA numbers as which: the GPUs differ ({', '.join(sorted(map(str, names)))}) "
            "and CUDA_DEVICE_ORDER is FASTEST_FIRST (CUDA's default, whose order is CUDA's guess); "
            "set CUDA_DEVICE_ORDER=PCI_BUS_ID, or list GPU UUIDs in CUDA_VISIBLE_DEVICES"
        )
    return by_bus


def _pci_key(pynvml, gpu) -> tuple[int, int, int]:
    info = pynvml.nvmlDeviceGetPciInfo(gpu)
    return int(info.domain), int(info.bus), int(info.device)


def _as_cuda_device(pynvml, gpus: list, gpu) -> CudaDevice:
    """The device CUDA uses for ``gpu``: on a GPU in MIG mode, its first MIG device."""
    index = gpus.index(gpu)
    migs = _mig_devices(pynvml, gpu)
    return CudaDevice(migs[0], index, mig=True) if migs else CudaDevice(gpu, index, mig=False)


def _mig_devices(pynvml, gpu) -> list:
    """The MIG devices of ``gpu``; [] when MIG mode is off (or NVML cannot say)."""
    mode = _try(pynvml.nvmlDeviceGetMigMode, gpu)
    current = mode[0] if isinstance(mode, (list, tuple)) and mode else mode
    if current != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    devices = []
    for slot in range(_try(pynvml.nvmlDeviceGetMaxMigDeviceCount, gpu) or 0):
        handle = _try(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, gpu, slot)
        if handle is not None:  # an empty slot: NVML_ERROR_NOT_FOUND
            devices.append(handle)
    return devices


def _by_uuid(pynvml, gpus: list, entry: str):
    """The GPU whose UUID is ``entry``, or starts with it (CUDA takes a unique prefix); None if none or several."""
    wanted = entry.strip().lower()
    matches = [gpu for gpu in gpus if (_text(_try(pynvml.nvmlDeviceGetUUID, gpu)) or "").lower().startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def _mig_by_uuid(pynvml, gpus: list, entry: str) -> CudaDevice | None:
    """The MIG device ``entry`` names: ``MIG-<uuid>``, or the older ``MIG-GPU-<uuid>/<gi>/<ci>``."""
    wanted = entry.strip().lower()
    legacy = wanted[len("mig-") :].split("/") if wanted.startswith("mig-gpu-") else None
    for index, gpu in enumerate(gpus):
        if legacy is not None and (_text(_try(pynvml.nvmlDeviceGetUUID, gpu)) or "").lower() != legacy[0]:
            continue
        for mig in _mig_devices(pynvml, gpu):
            if legacy is None:
                found = (_text(_try(pynvml.nvmlDeviceGetUUID, mig)) or "").lower().startswith(wanted)
            else:
                instance = (
                    _try(pynvml.nvmlDeviceGetGpuInstanceId, mig),
                    _try(pynvml.nvmlDeviceGetComputeInstanceId, mig),
                )
                found = len(legacy) == 3 and [str(part) for part in instance] == legacy[1:]
            if found:
                return CudaDevice(mig, index, mig=True)
    return None


def device_memory_used_bytes(device: str) -> int | None:
    """NVML's memory in use on ``cuda:N`` (its MIG slice, if it is one), every process included; None if unknown."""
    with _nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(device)).used)
        except Exception:
            return None


def process_device_memory_bytes(device: str, pid: int | None = None) -> int | None:
    """What process ``pid`` (this one) holds on ``cuda:N``, by NVML's account of it; None where NVML cannot say.

    NVML names processes by the host's PIDs: in a container with its own PID namespace this
    process is not found. On a MIG device NVML does not count memory per process.
    """
    pid = os.getpid() if pid is None else pid
    with _nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(nvml_handle(device))
        except Exception:
            return None
        used = [process.usedGpuMemory for process in processes if process.pid == pid]
        return int(used[0]) if used and used[0] is not None else None


class DeviceMemoryMeter:
    """What this process holds on a CUDA device, measured through NVML without touching CUDA.

    Made before this process starts CUDA, it notes the device's memory in use then. Later
    readings are NVML's figure for this process, or where NVML has none (a container's PID
    namespace, a MIG slice), the device's memory in use less the note: right while no other
    process starts or ends on the device in the meantime.
    """

    def __init__(self, device: str):
        self.device = device
        self.used_before_bytes = device_memory_used_bytes(device)

    def process_bytes(self) -> int | None:
        """This process's memory on the device now; None where NVML cannot tell."""
        own = process_device_memory_bytes(self.device)
        if own is not None:
            return own
        if self.used_before_bytes is None:
            return None
        used = device_memory_used_bytes(self.device)
        return None if used is None else max(0, used - self.used_before_bytes)

    def outside_bytes(self, allocator_bytes: int) -> int | None:
        """What this process holds on the device beyond ``allocator_bytes`` (the CUDA context, kernels, libraries)."""
        held = self.process_bytes()
        return None if held is None else max(0, held - allocator_bytes)


@contextlib.contextmanager
def _nvml():
    """pynvml, initialised for the block (NVML counts its users), or None where there is no NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def nvml_error_text(error: BaseException) -> str:
    """Why NVML failed, in words a person can act on."""
    name = type(error).__name__
    if isinstance(error, AutobatchError):
        return str(error)
    if isinstance(error, ImportError):
        return "nvidia-ml-py (module pynvml) is not installed"
    if name == "NVMLError_LibraryNotFound":
        return "no NVIDIA driver: NVML's library libnvidia-ml.so.1 was not found"
    if name == "NVMLError_DriverNotLoaded":
        return "the NVIDIA kernel driver is not loaded"
    if name == "NVMLError_NoPermission":
        return "no permission to use the NVIDIA driver (/dev/nvidia*)"
    if name == "NVMLError_LibRmVersionMismatch":
        return "the NVIDIA driver and its user-space library differ in version (reboot or reinstall the driver)"
    text = str(error).strip()
    return f"{name}: {text}" if text and text not in name else name


def nvml_report() -> dict[str, Any]:
    """What the NVIDIA driver says through NVML: its versions and each GPU; or why it says nothing."""
    report: dict[str, Any] = {"available": False, "devices": []}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:
        report["error"] = nvml_error_text(error)
        nodes = glob.glob("/dev/nvidia[0-9]*")
        report["device_nodes"] = sorted(nodes)
        report["driver_loaded"] = os.path.exists("/proc/driver/nvidia/version")
        return report
    try:
        report["available"] = True
        report["driver_version"] = _text(_try(pynvml.nvmlSystemGetDriverVersion))
        cuda = _try(pynvml.nvmlSystemGetCudaDriverVersion)
        report["cuda_driver_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
        report["nvml_version"] = _text(_try(pynvml.nvmlSystemGetNVMLVersion))
        for index in range(pynvml.nvmlDeviceGetCount()):
            report["devices"].append(_nvml_device(pynvml, index))
    except Exception as error:
        report["error"] = nvml_error_text(error)
    try:
        report["cuda_devices"] = [_cuda_device_entry(pynvml, device) for device in cuda_devices(pynvml)]
    except Exception as error:
        report["cuda_devices_error"] = nvml_error_text(error)
    finally:
        pynvml.nvmlShutdown()
    return report


def _nvml_device(pynvml, index: int) -> dict[str, Any]:
    """One GPU as NVML sees it: name, memory, and what it is busy with (where the driver says)."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    device: dict[str, Any] = {
        "index": index,
        "name": _text(_try(pynvml.nvmlDeviceGetName, handle)),
        "uuid": _text(_try(pynvml.nvmlDeviceGetUUID, handle)),
        "memory_total_bytes": int(memory.total),
        "memory_used_bytes": int(memory.used),
        "memory_free_bytes": int(memory.free),
    }
    rates = _try(pynvml.nvmlDeviceGetUtilizationRates, handle)
    if rates is not None:
        device["gpu_utilization"] = rates.gpu
    power = _try(pynvml.nvmlDeviceGetPowerUsage, handle)
    if power is not None:
        device["power_watts"] = power / 1000
    limit = _try(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    if limit is not None:
        device["power_limit_watts"] = limit / 1000
    mig = _try(pynvml.nvmlDeviceGetMigMode, handle)
    if isinstance(mig, (list, tuple)) and mig and mig[0]:
        device["mig_enabled"] = True
    processes = _try(pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
    if processes is not None:
        device["processes"] = len(processes)
    return device


def _cuda_device_entry(pynvml, device: CudaDevice) -> dict[str, Any]:
    """``cuda:N`` as NVML sees it: its GPU's NVML index, and its own UUID and memory (a MIG slice's, if one)."""
    memory = pynvml.nvmlDeviceGetMemoryInfo(device.handle)
    return {
        "nvml_index": device.nvml_index,
        "mig": device.mig,
        "uuid": _text(_try(pynvml.nvmlDeviceGetUUID, device.handle)),
        "memory_total_bytes": int(memory.total),
        "memory_used_bytes": int(memory.used),
    }


def _torch_total_memory_bytes(device: str) -> tuple[int | None, str]:
    """(total bytes, or None and why) from ``torch.cuda.mem_get_info`` in a child process.

    A child, so that this process neither imports torch nor holds a CUDA context.
    """
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        return None, "not installed"
    code = "import sys, torch; print(torch.cuda.mem_get_info(int(sys.argv[1]))[1])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(cuda_index(device))], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, str(error)
    if done.returncode == 0 and done.stdout.strip().isdigit():
        return int(done.stdout.strip()), ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    return None, lines[-1] if lines else f"exit code {done.returncode}"


def _try(function, *args):
    try:
        return function(*args)
    except Exception:
        return None


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
