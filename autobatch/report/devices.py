"""``autobatch devices``'s report: what each source says about the devices, and what it adds up to.

It asks NVML (the NVIDIA driver) directly, and PyTorch and TensorFlow each in a child process
of its own, so this process imports no framework and holds no CUDA context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from autobatch.core.devices import default_device, nvml_report, visible_cuda_ids
from autobatch.core.memory import DEFAULT_SHARE, cgroup_memory_limit, device_memory_bytes, format_bytes

#: seconds one framework may take to import and list its devices
FRAMEWORK_PROBE_TIMEOUT = 180


def device_report(frameworks: bool = True) -> dict[str, Any]:
    """Everything ``autobatch devices`` prints, as plain JSON values."""
    probes = {name: _FrameworkProbe(name) for name in ("torch", "tensorflow")} if frameworks else {}
    for probe in probes.values():
        probe.start()  # both import at once
    nvml = nvml_report()
    cpu = _cpu_report()
    report: dict[str, Any] = {
        "default_device": default_device(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvml": nvml,
    }
    for name, probe in probes.items():
        report[name] = probe.result()
    report["cpu"] = cpu
    report["devices"] = _usable_devices(report)
    usable_gpus = [d for d in report["devices"] if d["device"] != "cpu" and d["usable"]]
    report["gpu_usable"] = bool(usable_gpus)
    report["why_no_gpu"] = None if usable_gpus else "; ".join(why_no_gpu(report))
    return report


def devices_text(report: dict[str, Any]) -> str:
    """``autobatch devices`` for a person."""
    lines = [f"default device: {report['default_device']}"]
    if report["cuda_visible_devices"] is not None:
        lines.append(f"CUDA_VISIBLE_DEVICES={report['cuda_visible_devices']!r}")
    nvml = report["nvml"]
    if nvml["available"]:
        lines.append(
            f"NVIDIA driver {nvml.get('driver_version')} (CUDA {nvml.get('cuda_driver_version')}), "
            f"NVML sees {len(nvml['devices'])} GPU(s)"
        )
        for device in nvml["devices"]:
            lines.append(
                f"  GPU {device['index']}: {device['name']}, {format_bytes(device['memory_total_bytes'])} total, "
                f"{format_bytes(device['memory_used_bytes'])} in use"
                + (f", {device['gpu_utilization']}% busy" if "gpu_utilization" in device else "")
            )
    else:
        lines.append(f"NVIDIA driver: unusable: {nvml.get('error')}")
    for name, title in (("torch", "PyTorch"), ("tensorflow", "TensorFlow")):
        info = report.get(name)
        if info is None:
            continue
        if not info.get("installed"):
            lines.append(f"{title}: not installed")
        elif info.get("error"):
            lines.append(f"{title}: failed to load: {info['error']}")
        elif name == "torch":
            gpus = ", ".join(f"cuda:{d['index']} {d['name']}" for d in info.get("devices", [])) or "no GPU"
            lines.append(
                f"{title} {info['version']} (CUDA build: {info.get('cuda_build') or 'none, CPU only'}): {gpus}"
            )
        else:
            gpus = ", ".join(g["name"] for g in info.get("gpus", [])) or "no GPU"
            lines.append(
                f"{title} {info['version']} ({info.get('package') or 'tensorflow'}, CUDA: "
                f"{info.get('cuda_version') or 'none'}): {gpus}"
            )
    cpu = report["cpu"]
    lines.append(
        f"CPU: {cpu['usable_cores']} usable cores ({cpu['logical_cores']} logical), "
        f"RAM {format_bytes(cpu['ram_total_bytes'])} "
        f"total, {format_bytes(cpu['ram_available_bytes'])} available"
        + (f" (cgroup limit {format_bytes(cpu['cgroup_limit_bytes'])})" if "cgroup_limit_bytes" in cpu else "")
    )
    lines += ["", "devices:"]
    for device in report["devices"]:
        if device["usable"]:
            budget = (
                f"default budget {format_bytes(device['default_budget_bytes'])} "
                f"({DEFAULT_SHARE:.0%} of {format_bytes(device['memory_bytes'])})"
            )
            users = ", ".join(device["frameworks"]) or "-"
            lines.append(f"  {device['device']:<8} usable      {budget}; frameworks: {users}")
        else:
            lines.append(f"  {device['device']:<8} not usable: {device.get('why_not')}")
    if report["why_no_gpu"]:
        lines.append(f"  {'cuda':<8} no usable GPU:")
        lines += [f"{'':<13}- {reason}" for reason in why_no_gpu(report)]
    return "\n".join(lines)


# --- what each source says ------------------------------------------------------------------------


_TORCH_PROBE = r"""
import json, warnings
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    out["version"] = torch.__version__
    out["cuda_build"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["devices"] = []
    for index in range(torch.cuda.device_count() if out["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(index)
        device = {"index": index, "name": props.name, "total_memory_bytes": int(props.total_memory),
                  "compute_capability": f"{props.major}.{props.minor}"}
        try:
            free, total = torch.cuda.mem_get_info(index)
            device["free_memory_bytes"] = int(free)
        except Exception as error:
            device["error"] = f"{type(error).__name__}: {error}"
        out["devices"].append(device)
out["warnings"] = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()][:3]
print(json.dumps(out))
"""

_TENSORFLOW_PROBE = r"""
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
build = tf.sysconfig.get_build_info()
out = {"version": tf.__version__, "built_with_cuda": bool(tf.test.is_built_with_cuda()),
       "cuda_version": build.get("cuda_version"), "cudnn_version": build.get("cudnn_version"), "gpus": []}
for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    capability = details.get("compute_capability")
    out["gpus"].append({"name": gpu.name, "device_name": details.get("device_name"),
                        "compute_capability": ".".join(map(str, capability)) if capability else None})
print(json.dumps(out))
"""

# Distributions that provide ``import tensorflow``, and whether they can use a GPU.
_TENSORFLOW_PACKAGES = (
    "tensorflow-cpu",
    "tensorflow",
    "tensorflow-gpu",
    "tf-nightly-cpu",
    "tf-nightly",
    "tensorflow-intel",
)


class _FrameworkProbe:
    """One framework asked in a child process: imported quietly, its devices listed as JSON."""

    def __init__(self, name: str):
        self.name = name
        self.process: subprocess.Popen | None = None
        self.report: dict[str, Any] = {"installed": _module_installed("torch" if name == "torch" else "tensorflow")}
        if name == "tensorflow":
            self.report["package"] = _installed_distribution(_TENSORFLOW_PACKAGES)

    def start(self) -> None:
        if not self.report["installed"]:
            return
        code = _TORCH_PROBE if self.name == "torch" else _TENSORFLOW_PROBE
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def result(self) -> dict[str, Any]:
        if self.process is None:
            self.report["usable"] = False
            return self.report
        try:
            stdout, stderr = self.process.communicate(timeout=FRAMEWORK_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            self.report["error"] = f"importing {self.name} took longer than {FRAMEWORK_PROBE_TIMEOUT} s"
            return self.report
        lines = stdout.strip().splitlines()
        try:
            self.report.update(json.loads(lines[-1]))
        except (IndexError, ValueError):
            detail = [line for line in stderr.strip().splitlines() if line.strip()]
            self.report["error"] = detail[-1][:500] if detail else f"exit code {self.process.returncode}"
        return self.report


def _cpu_report() -> dict[str, Any]:
    """The cores this process may use and the RAM there is (and the cgroup's limit, under one)."""
    import psutil

    memory = psutil.virtual_memory()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = psutil.cpu_count()
    report = {
        "logical_cores": psutil.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable,
        "ram_total_bytes": int(memory.total),
        "ram_available_bytes": device_memory_bytes("cpu"),
    }
    limit = cgroup_memory_limit()
    if limit is not None:
        report["cgroup_limit_bytes"], report["cgroup_used_bytes"] = limit
    return report


# --- what they add up to --------------------------------------------------------------------------


def _usable_devices(report: dict[str, Any]) -> list[dict[str, Any]]:
    cpu = report["cpu"]
    frameworks = [
        name
        for name in ("torch", "tensorflow")
        if (report[name].get("version") if name in report else _module_installed(name))  # not asked: installed
    ]
    devices = [
        {
            "device": "cpu",
            "usable": True,
            "memory_bytes": cpu["ram_available_bytes"],
            "default_budget_bytes": int(DEFAULT_SHARE * cpu["ram_available_bytes"]),
            "frameworks": frameworks,
        }
    ]
    # cuda:N as CUDA numbers it (by PCI bus id or UUID; NVML's indices are its own), with its
    # own memory: a MIG slice's, not its GPU's.
    by_index = {d["index"]: d for d in report["nvml"]["devices"]}
    listed = [{**by_index.get(cuda["nvml_index"], {}), **cuda} for cuda in report["nvml"].get("cuda_devices", [])]
    torch_devices = report.get("torch", {}).get("devices", [])
    tf_gpus = report.get("tensorflow", {}).get("gpus", [])
    count = max(len(listed), len(torch_devices))
    for index in range(count):
        nvml = listed[index] if index < len(listed) else None
        total = (nvml or {}).get("memory_total_bytes") or (
            torch_devices[index]["total_memory_bytes"] if index < len(torch_devices) else None
        )
        seen_by = (("torch", index < len(torch_devices)), ("tensorflow", index < len(tf_gpus)))
        users = [name for name, seen in seen_by if seen]
        entry: dict[str, Any] = {
            "device": f"cuda:{index}",
            "usable": bool(users) or (nvml is not None and not report.get("torch") and not report.get("tensorflow")),
            "name": (nvml or {}).get("name") or (torch_devices[index]["name"] if index < len(torch_devices) else None),
            "memory_bytes": total,
            "default_budget_bytes": int(DEFAULT_SHARE * total) if total else None,
            "frameworks": users,
        }
        if nvml is None:
            reason = report["nvml"].get("cuda_devices_error") or "NVML does not list it"
            entry["why_not_nvml"] = f"{reason}: telemetry and %-budgets fall back to PyTorch"
        if not entry["usable"]:
            entry["why_not"] = "; ".join(_framework_reasons(report)) or "no installed framework sees it"
        devices.append(entry)
    return devices


def why_no_gpu(report: dict[str, Any]) -> list[str]:
    """Why there is no usable GPU, from the driver up, one reason a line."""
    reasons = []
    nvml = report["nvml"]
    visible = report["cuda_visible_devices"]
    if visible is not None and not _visible(visible):
        reasons.append(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    if not nvml["available"]:
        driver = nvml.get("error", "NVML is unavailable")
        if not nvml.get("device_nodes"):
            driver += ", and there are no /dev/nvidia* device nodes (no GPU is passed to this machine or container)"
        reasons.append(driver)
    elif not nvml["devices"]:
        reasons.append(f"the NVIDIA driver {nvml.get('driver_version')} sees no GPU")
    reasons += _framework_reasons(report)
    return reasons or ["no GPU found"]


def _framework_reasons(report: dict[str, Any]) -> list[str]:
    reasons = []
    torch = report.get("torch")
    if torch is not None:
        if not torch.get("installed"):
            reasons.append("PyTorch is not installed")
        elif torch.get("error"):
            reasons.append(f"PyTorch failed to load: {torch['error']}")
        elif not torch.get("cuda_build"):
            reasons.append(f"PyTorch {torch['version']} is a CPU-only build (torch.version.cuda is None)")
        elif not torch.get("cuda_available"):
            warning = f" ({torch['warnings'][0]})" if torch.get("warnings") else ""
            reasons.append(
                f"PyTorch {torch['version']} is built for CUDA {torch['cuda_build']} but finds no usable GPU{warning}"
            )
    tensorflow = report.get("tensorflow")
    if tensorflow is not None:
        package = tensorflow.get("package") or "tensorflow"
        if not tensorflow.get("installed"):
            reasons.append("TensorFlow is not installed")
        elif tensorflow.get("error"):
            reasons.append(f"TensorFlow failed to load: {tensorflow['error']}")
        elif not tensorflow.get("built_with_cuda"):
            reasons.append(
                f"{package} {tensorflow['version']} is built without CUDA and cannot use a GPU "
                "(install tensorflow[and-cuda])"
            )
        elif not tensorflow.get("gpus"):
            cuda = tensorflow.get("cuda_version")
            reasons.append(f"{package} {tensorflow['version']} is built for CUDA {cuda} but sees no GPU")
    return reasons


# --- small helpers --------------------------------------------------------------------------------


def _visible(value: str) -> bool:
    return bool(visible_cuda_ids(value))


def _module_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _installed_distribution(names: tuple[str, ...]) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            version(name)
            return name
        except PackageNotFoundError:
            continue
    return None
