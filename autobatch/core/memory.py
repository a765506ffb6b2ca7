"""Memory budgets: parsing ``"1.5GiB"``, ``"800MB"`` or ``"75%"`` and resolving them to bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from autobatch.errors import InvalidParameterError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")
_ALLOWED = "expected a size such as '1.5GiB', '800MB', '1073741824' or a share of the device such as '75%'"


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget, absolute (``nbytes``) or a share of the device (``fraction``).

    A share means a share of the GPU's total memory, or of the machine's available
    RAM when the trial runs on the CPU.
    """

    nbytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.nbytes is None) == (self.fraction is None):
            raise TypeError("MemoryBudget takes exactly one of nbytes and fraction")

    @property
    def share(self) -> float:
        """The share of the device, for a budget given as one (``fraction``)."""
        if self.fraction is None:
            raise TypeError(f"the budget {self} is absolute, not a share")
        return self.fraction

    @classmethod
    def parse(cls, value: str | int | float | MemoryBudget, parameter: str = "memory_budget") -> MemoryBudget:
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, bool):
            raise InvalidParameterError(parameter, value, _ALLOWED)
        if isinstance(value, int):
            if value <= 0:
                raise InvalidParameterError(parameter, value, "must be a positive number of bytes")
            return cls(nbytes=value)
        if not isinstance(value, str):
            raise InvalidParameterError(parameter, value, _ALLOWED)
        match = _PATTERN.match(value)
        if not match:
            raise InvalidParameterError(parameter, value, _ALLOWED)
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise InvalidParameterError(parameter, value, "a share must lie in (0%, 100%]")
            return cls(fraction=number / 100)
        if unit not in _UNITS:
            raise InvalidParameterError(parameter, value, _ALLOWED)
        nbytes = int(number * _UNITS[unit])
        if nbytes <= 0:
            raise InvalidParameterError(parameter, value, "must be a positive size")
        return cls(nbytes=nbytes)

    def resolve(self, device: str = "cpu") -> int:
        """The budget in bytes on ``device`` (``"cpu"`` or ``"cuda:N"``)."""
        if self.nbytes is not None:
            return self.nbytes
        return int(self.share * device_memory_bytes(device))

    def __str__(self) -> str:
        if self.nbytes is not None:
            return format_bytes(self.nbytes)
        return f"{self.share * 100:g}%"


#: the budget when none is given: this share of the GPU's total memory, or of the RAM available on the CPU
DEFAULT_SHARE = 0.9


def describe_budget(budget: MemoryBudget, device: str, nbytes: int, why: str | None = None) -> str:
    """One line for a person: the budget in bytes, what it is a share of, and ``why`` it was chosen."""
    if budget.fraction is not None:
        whole = f"{device}'s total memory" if device.startswith("cuda") else f"the RAM available on {device} now"
        line = f"memory budget {format_bytes(nbytes)} = {budget} of {whole} ({format_bytes(nbytes / budget.fraction)})"
    else:
        line = f"memory budget {format_bytes(nbytes)} on {device}"
    return f"{line}: {why}" if why else line


def allocator_cap_bytes(budget_bytes: int, outside_bytes: int | None, device: str) -> int:
    """The cap for the allocator a budget governs: the budget less what the process holds outside it.

    On a GPU the framework's allocator is only part of what a process holds: the CUDA context,
    the kernels loaded into it and the libraries' own memory lie outside it (0.5-1 GiB). They
    count against the budget too, so that a wall found under a 24 GiB budget fits a 24 GiB card.
    """
    outside = int(outside_bytes or 0)
    if budget_bytes - outside <= 0:
        raise InvalidParameterError(
            "memory_budget",
            format_bytes(budget_bytes),
            f"must exceed the {format_bytes(outside)} this process holds on {device} outside the framework's "
            "allocator before any training (the CUDA context and libraries)",
        )
    return budget_bytes - outside


def over_budget_text(allocator_peak_bytes: int, outside_bytes: int, budget_bytes: int, device: str) -> str:
    """Why a trial that ran to its end still does not fit: what it held on ``device`` against the budget."""
    return (
        f"over the memory budget: the trial held {format_bytes(allocator_peak_bytes + outside_bytes)} on {device} "
        f"(allocator peak {format_bytes(allocator_peak_bytes)} + {format_bytes(outside_bytes)} outside it: CUDA "
        f"context, kernels and library workspaces), more than the budget of {format_bytes(budget_bytes)}"
    )


def budget_coverage(framework: str | None, device: str) -> str:
    """What a memory budget covers on ``device`` with ``framework``, in words for a person."""
    if device == "cpu":
        return (
            "the whole trial process's data segment (RLIMIT_DATA): the framework, the model, the data and every "
            "buffer on the heap"
        )
    outside = (
        "plus what the process holds outside that allocator (the CUDA context, kernels and library workspaces, "
        "measured with NVML per trial); a trial whose sum exceeds the budget counts as out of memory"
    )
    if framework == "torch":
        return (
            "PyTorch's caching allocator (its peak counted as bytes reserved, capped at the budget less the "
            f"memory outside it), {outside}"
        )
    if framework == "tensorflow":
        return (
            "TensorFlow's GPU allocator (a logical device whose memory_limit is the budget; its peak counted as "
            f"bytes in use), {outside}"
        )
    return f"the allocator of the {framework or '?'} backend as it reports its peak, {outside}"


def device_memory_bytes(device: str) -> int:
    """Total memory of a CUDA device (via NVML), or the RAM available now for ``"cpu"``."""
    if device.startswith("cuda"):
        from autobatch.core.devices import cuda_total_memory_bytes

        return cuda_total_memory_bytes(device)
    import psutil

    available = int(psutil.virtual_memory().available)
    limit = cgroup_memory_limit()
    if limit is not None:  # in a container, the cgroup's limit binds before the machine's RAM does
        available = min(available, max(0, limit[0] - limit[1]))
    return available


def cgroup_memory_limit() -> tuple[int, int] | None:
    """(limit, bytes in use less reclaimable file cache) of this process's memory cgroup, or None without a limit."""
    try:
        with open("/proc/self/cgroup") as handle:
            entries = [line.strip().split(":", 2) for line in handle if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in entries:
        if controllers == "":  # cgroup v2
            files, root = ("memory.max", "memory.current", "inactive_file"), "/sys/fs/cgroup"
        elif "memory" in controllers.split(","):  # cgroup v1
            files, root = (
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
                "/sys/fs/cgroup/memory",
            )
        else:
            continue
        # Inside a container the cgroup's own directory is usually mounted as the root.
        for directory in (f"{root}{path.rstrip('/')}", root):
            limit, usage = _read_number(f"{directory}/{files[0]}"), _read_number(f"{directory}/{files[1]}")
            if limit is None or usage is None:
                continue
            if limit >= 2**60:  # "max", or v1's page-rounded LONG_MAX: no limit here
                break
            inactive = _read_stat(f"{directory}/memory.stat", files[2]) or 0
            return limit, max(0, usage - inactive)
    return None


def _read_number(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    if text == "max":
        return 2**63 - 1
    return int(text) if text.isdigit() else None


def _read_stat(path: str, key: str) -> int | None:
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return None


def format_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"
