"""What devices the trials can run on, found without importing a framework.

The device facts that every stage may ask (the default device, a GPU's total memory, NVML's
handle) and what NVML says of the driver and each GPU, for ``autobatch devices``.
"""

from __future__ import annotations

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
    """NVML's handle for ``cuda:N`` as this process sees it (NVML must be initialised).

    CUDA numbers the GPUs that ``CUDA_VISIBLE_DEVICES`` lists, in its order; NVML numbers
    all of them. An entry given as a UUID (``GPU-...``, ``MIG-...``) is looked up by UUID.
    """
    import pynvml

    index = cuda_index(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = visible_cuda_ids(visible)
        if index >= len(ids):
            raise AutobatchError(f"{device} is not visible: CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)} GPU(s)")
        if ids[index].isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(ids[index]))
        return pynvml.nvmlDeviceGetHandleByUUID(ids[index])
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def nvml_error_text(error: BaseException) -> str:
    """Why NVML failed, in words a person can act on."""
    name = type(error).__name__
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
