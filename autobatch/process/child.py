"""What every child process of autobatch shares: its start, its memory cap, its end and its log.

A trial (:mod:`autobatch.process.trial_child`) and a training run (:mod:`autobatch.training.child`)
each run in a new interpreter. The parent starts it with :func:`start_child` (its own process
group, so Ctrl-C reaches only the parent, which stops the child with :func:`kill_process_group`);
the child calls :func:`enter_child` first, before any framework is imported, so that the memory
budget counts the whole process. The parent reads what the child logged with :func:`log_tail`
and :func:`last_line`; the child measures its own peak with :class:`CpuPeakMeter`.

A budget below what the framework and the task need to load is bad input, not an OOM of a
trial: :func:`budget_below_load_error` measures what loading needs in a fresh process and
says so in one line.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import IO, Any

from autobatch.core.memory import MemoryBudget, format_bytes
from autobatch.errors import InvalidParameterError

__all__ = [
    "ALLOCATOR_SETTINGS",
    "ALLOCATOR_VARIABLE",
    "CpuPeakMeter",
    "allocator_environment",
    "allocator_setting",
    "budget_as_given",
    "budget_below_load_error",
    "child_allocator_setting",
    "child_setup",
    "enter_child",
    "kill_process_group",
    "last_line",
    "log_tail",
    "memory_status",
    "start_child",
    "tensorflow_tensors_from_malloc",
    "thread_stack_bytes",
]

# Measures what loading takes, in a process of its own with no cap (see budget_below_load_error).
_MEASURE_COMMAND = "import sys; from autobatch.process.child import _measure_load; sys.exit(_measure_load(sys.argv[1]))"


def child_setup(device: str, memory_budget_bytes: int | None) -> dict[str, Any]:
    """The part of a child's setup that :func:`enter_child` reads: the device, the budget and the import path."""
    return {
        "device": device,
        "memory_budget_bytes": memory_budget_bytes,
        "sys_path": [entry for entry in sys.path if entry],
    }


def enter_child(setup: dict[str, Any]) -> None:
    """The child's first step: cap its memory on the CPU, and import what the parent could.

    On the CPU, ``RLIMIT_DATA`` is set to the budget before any framework is imported: the
    whole process counts, so an allocation past the budget fails as the framework's own OOM
    (PyTorch: ``DefaultCPUAllocator: can't allocate memory``, TensorFlow:
    ``ResourceExhaustedError``). Under that cap, threads then start with small stacks
    (:func:`lower_thread_stacks`) and TensorFlow's tensors come from malloc
    (:func:`tensorflow_tensors_from_malloc`), so that what the cap counts is what the model
    holds. On an accelerator the backend caps its allocator later.
    """
    die_with_parent()
    budget_bytes = setup.get("memory_budget_bytes")
    if budget_bytes and setup["device"] == "cpu":
        import resource

        # Before the cap: under a budget too small to load in, the cap must be what fails, not ctypes
        lower_thread_stacks()
        tensorflow_tensors_from_malloc()
        resource.setrlimit(resource.RLIMIT_DATA, (budget_bytes, budget_bytes))
    for entry in reversed(setup.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)


#: the stack a child's threads get by default under a CPU budget (glibc's own: RLIMIT_STACK, 8 MiB)
THREAD_STACK_BYTES = 2**21
#: the stack glibc gives a thread where nobody changed RLIMIT_STACK (Linux's 8 MiB)
_STOCK_THREAD_STACK_BYTES = 2**23


def lower_thread_stacks(size_bytes: int = THREAD_STACK_BYTES) -> None:
    """Give the threads this process starts from now on a ``size_bytes`` stack, where glibc would give 8 MiB.

    A thread's stack is a private writable mapping, which ``RLIMIT_DATA`` counts in full
    (Linux 4.7 and later), though a thread touches a few pages of it: with glibc's 8 MiB
    each, the 13 threads of a TensorFlow trial held ~60 MiB more of the budget than at
    2 MiB, which no peak reading sees (synthetic-images under 768 MiB: micro-batch 65 fitted,
    150 at 2 MiB; 1 MiB fitted no more, and leaves less room for deep recursion in a Python
    thread). PyTorch's trial has 3 threads: it gained nothing measurable. This sets the
    default of every thread created without a size of its own (``pthread_setattr_default_np``,
    glibc 2.18 and later; elsewhere nothing changes):
    TensorFlow's and tf.data's pools, oneDNN's, Python's threads, and PyTorch's OpenMP
    threads unless ``OMP_STACKSIZE`` sets theirs. The main thread's stack is not a mapping
    ``RLIMIT_DATA`` counts, and keeps its size. Forked trials inherit the setting.

    A user's own setting wins: glibc takes its default from ``RLIMIT_STACK`` (``ulimit -s``),
    and one that is not Linux's stock 8 MiB is kept, as is anything set here already;
    ``AUTOBATCH_ALLOCATOR=glibc-default`` keeps glibc's stacks too.
    """
    if os.environ.get(ALLOCATOR_VARIABLE) == "glibc-default" or thread_stack_bytes() != _STOCK_THREAD_STACK_BYTES:
        return
    libc = _libc()
    try:
        attr = ctypes.create_string_buffer(_PTHREAD_ATTR_BYTES)
        if libc.pthread_attr_init(attr) != 0:
            return
        try:
            if libc.pthread_attr_setstacksize(attr, ctypes.c_size_t(size_bytes)) == 0:
                libc.pthread_setattr_default_np(attr)
        finally:
            libc.pthread_attr_destroy(attr)
    except AttributeError:  # not glibc, or one older than 2.18
        return


def thread_stack_bytes() -> int | None:
    """The stack a thread created now gets by default; None where glibc cannot say (for a result's extras)."""
    if not sys.platform.startswith("linux"):
        return None
    size = ctypes.c_size_t()
    try:
        libc = _libc()
        attr = ctypes.create_string_buffer(_PTHREAD_ATTR_BYTES)
        if libc.pthread_getattr_default_np(attr) != 0:
            return None
        try:
            if libc.pthread_attr_getstacksize(attr, ctypes.byref(size)) != 0:
                return None
        finally:
            libc.pthread_attr_destroy(attr)
    except (OSError, AttributeError):
        return None
    return size.value


#: oneDNN's allocator takes TensorFlow's CPU tensors from malloc instead of its BFC pool when this is true
ONEDNN_SYSTEM_ALLOCATOR_VARIABLE = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"


def tensorflow_tensors_from_malloc() -> None:
    """Under a CPU budget, let TensorFlow's CPU tensors come from malloc, not from its BFC pool.

    TensorFlow's CPU allocator keeps every tensor of 4 KiB and up in a BFC pool that grows
    by regions of doubling size: the untouched rest of its last region counts against
    ``RLIMIT_DATA`` in full, and an allocation that fails waits 10 s for memory to be freed
    (a retry that cannot succeed: nothing else frees while it waits) before the trial can
    fail. From malloc instead (glibc's threshold fixed by :func:`allocator_environment` gives
    freed large blocks back), synthetic-images under a 768 MiB budget fits micro-batch 231
    rather than 150, and a trial past the wall fails in ~4 s rather than ~14 s; it costs a
    budgeted TensorFlow trial about a fifth of its throughput (0.79-0.84×), alike for every
    config, so the ranking stands. Set here, before any framework is imported (TensorFlow
    reads it once), so that the minimal loop of ``benchmarks/probe.py`` and a training child
    run under it too; a value the user set is kept, and ``AUTOBATCH_ALLOCATOR=glibc-default``
    keeps the pool. PyTorch does not read it.
    """
    if os.environ.get(ALLOCATOR_VARIABLE) != "glibc-default":
        os.environ.setdefault(ONEDNN_SYSTEM_ALLOCATOR_VARIABLE, "1")


#: room for a pthread_attr_t (56 bytes on x86-64, 64 on arm64)
_PTHREAD_ATTR_BYTES = 128


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


#: prctl(2)'s option that sends this process a signal when its parent thread ends
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Be killed (SIGKILL) when the parent ends, however it ends; Linux only, elsewhere nothing.

    A parent killed by a signal runs no clean-up: a child it left behind would otherwise live
    on, and a trial that never ends (a hang in the user's code) would hold its memory forever,
    with nobody left to enforce its time limit. A forked trial process calls this too, tying
    it to its worker.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent was gone before the request took hold
        os._exit(1)


#: the variable that chooses a child's allocator setting; its values are :data:`ALLOCATOR_SETTINGS`
ALLOCATOR_VARIABLE = "AUTOBATCH_ALLOCATOR"
#: "fixed-threshold" (the default) starts every child with glibc's mmap threshold fixed at
#: :data:`MALLOC_MMAP_THRESHOLD` and huge pages for what glibc maps; "glibc-default" adds nothing
ALLOCATOR_SETTINGS = ("fixed-threshold", "glibc-default")
#: glibc's variables, read once when a process starts (mallopt(3), tunables(7))
MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
TUNABLES_VARIABLE = "GLIBC_TUNABLES"
#: blocks of this size and up get pages of their own from glibc, returned to the system when freed
MALLOC_MMAP_THRESHOLD = 2**20
#: glibc 2.35+ asks the kernel for transparent huge pages (madvise) for what it maps; older ones ignore it
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
#: what a trial's result names as its allocator setting (the variables that decide it, as set)
_ALLOCATOR_VARIABLES = (
    "LD_PRELOAD",
    MMAP_THRESHOLD_VARIABLE,
    TUNABLES_VARIABLE,
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_CONF",
    "TCMALLOC_RELEASE_RATE",
)


def allocator_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a child starts with so that what ``RLIMIT_DATA`` counts follows what is held.

    By default glibc raises its mmap threshold to the largest block freed so far (up to
    32 MiB), after which a framework's activations come from the heap, whose holes a freed
    tensor leaves and which only shrinks from its top: a small micro-batch's freed
    activations still count, and the data segment depends on the order of allocation and on
    thread timing (PyTorch, micro-batch 128: budgets bisected at accumulation 1 and 8 needed
    581 and 612 MiB, runs near either passing and failing in turn). A threshold fixed at
    1 MiB gives every block of 1 MiB and up pages of its own, returned when freed (the same
    two needed 500 and 503 MiB, repeatable to 1 MiB). Fresh pages cost a page fault each, which the threshold alone
    makes PyTorch pay for in system time; huge pages (``glibc.malloc.hugetlb=1``) make those
    faults several times fewer. Measured by ``benchmarks/memory.py`` on synthetic-images
    (peak above the baseline, 64×4 against 256×1): PyTorch 0.57× under glibc's default,
    0.25× so, at 0.8× glibc default's CPU time (the threshold alone: 1.4×); TensorFlow
    0.3× either way. The table there has the other thresholds, jemalloc (whose address
    space outgrows what the trial's reading sees) and tcmalloc (cheaper in CPU time, but
    36 % more memory at 256×1) too. Where the kernel gives no transparent huge pages
    (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``never``) the threshold still holds.
    Huge pages have one cost: glibc then grows its heap in 2 MiB steps, so the wall a process
    reaches is repeatable to 2 MiB, not to one page (a probe's safety margin covers it).

    These are environment variables, not ``mallopt`` in :func:`enter_child` (which measured
    the same peaks), so that they hold from the interpreter's first allocation, in any
    process the child starts, and are the very setting a user who trains elsewhere can give
    their own run. A threshold the user set (``MALLOC_MMAP_THRESHOLD_``, or
    ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``) is kept, and so is a
    ``glibc.malloc.hugetlb`` of theirs; ``AUTOBATCH_ALLOCATOR=glibc-default`` adds nothing.
    An allocator loaded with ``LD_PRELOAD`` ignores them.
    """
    environ = os.environ if environ is None else environ
    setting = environ.get(ALLOCATOR_VARIABLE) or ALLOCATOR_SETTINGS[0]
    if setting not in ALLOCATOR_SETTINGS:
        raise InvalidParameterError(ALLOCATOR_VARIABLE, setting, f"must be one of {', '.join(ALLOCATOR_SETTINGS)}")
    if setting == "glibc-default":
        return {}
    tunables = environ.get(TUNABLES_VARIABLE, "")
    added: dict[str, str] = {}
    if MMAP_THRESHOLD_VARIABLE not in environ and "glibc.malloc.mmap_threshold" not in tunables:
        added[MMAP_THRESHOLD_VARIABLE] = str(MALLOC_MMAP_THRESHOLD)
    if HUGE_PAGES_TUNABLE not in tunables:
        added[TUNABLES_VARIABLE] = ":".join(part for part in (tunables, f"{HUGE_PAGES_TUNABLE}=1") if part)
    return added


def allocator_setting(environ: Mapping[str, str] | None = None) -> str:
    """The allocator setting this process runs with, as the variables that decide it (for a result's extras)."""
    environ = os.environ if environ is None else environ
    shown = [f"{name}={environ[name]}" for name in _ALLOCATOR_VARIABLES if environ.get(name)]
    return " ".join(shown) or "glibc default (dynamic mmap threshold)"


def child_allocator_setting() -> str:
    """The allocator setting a child started from here runs with (for a note written by the parent)."""
    return allocator_setting({**os.environ, **allocator_environment()})


def start_child(entry: str, argument: str, *, output: IO[bytes] | None, pass_fds: tuple[int, ...]) -> subprocess.Popen:
    """Start a new interpreter that returns ``module:function``'s ``function(argument)`` as its exit code.

    The function is imported rather than run with ``-m``: importing ``autobatch`` imports
    the parent side too, and ``-m`` would then load the child's module a second time, as
    ``__main__``. The child runs in a session of its own: Ctrl-C in a terminal reaches the
    parent only, which then stops the child and whatever it started with
    :func:`kill_process_group`. It writes to ``output``; ``None`` lets its output through.
    """
    module, _, function = entry.partition(":")
    command = f"import sys; from {module} import {function}; sys.exit({function}(sys.argv[1]))"
    env = {**os.environ, **allocator_environment()}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter stays out of the log
    # torch.cuda.is_available() (and device_count()) in a task loader then asks NVML instead of
    # initialising CUDA, which would leave every trial forked from the loaded child unable to
    # use CUDA ("Cannot re-initialize CUDA in forked subprocess").
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(
        [sys.executable, "-c", command, argument],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env=env,
        pass_fds=pass_fds,
        start_new_session=True,
    )


def kill_process_group(process: subprocess.Popen) -> None:
    """Kill a child started by :func:`start_child` and anything it started (data-loader workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(log: str | os.PathLike[str] | IO[bytes], start: int = 0, limit: int = 4000) -> str:
    """The last ``limit`` bytes of what a child logged after offset ``start``; "" if it cannot be read.

    ``log`` is a path, or the open file a child writes to: that one is read at an offset,
    so the position the child writes at does not move.
    """
    try:
        if isinstance(log, (str, os.PathLike)):
            with open(log, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(max(start, size - limit))
                data = handle.read()
        else:
            descriptor = log.fileno()
            size = os.fstat(descriptor).st_size
            begin = max(start, size - limit)
            data = os.pread(descriptor, max(0, size - begin), begin)
    except (OSError, ValueError):
        return ""
    return data.decode("utf-8", errors="replace")


def last_line(text: str, limit: int = 500) -> str:
    """The last line of ``text`` that is not blank, stripped and cut at ``limit`` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def memory_status() -> dict[str, int]:
    """VmData, VmRSS, VmHWM, RssFile and friends of this process, from /proc/self/status, in bytes."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key.startswith(("Vm", "Rss")):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


class CpuPeakMeter:
    """This process's memory on the CPU as ``RLIMIT_DATA`` counts it, from a start to its peak.

    ``RLIMIT_DATA`` counts the data segment (VmData), which Linux keeps no peak of; resident
    memory (VmRSS) has one (VmHWM) that can be reset. So memory is read as the data segment
    at the start plus how far resident memory rose since, less the pages of mapped files
    that became resident meanwhile: PyTorch pages in ~40 MiB of its library's kernels during
    a first trial, and counting them read a trial that ran under a 640 MiB cap as a 663 MiB
    peak. The kernel's virtual peak (VmPeak, which never falls) bounds the result from
    above: the data segment cannot have grown further than the whole address space did.
    """

    def __init__(self) -> None:
        self.start_data_bytes: int | None = None
        self.start_resident_bytes: int | None = None
        self.start_file_bytes = 0
        self.start_outside_data_bytes: int | None = None  # the address space that is not data

    def start(self, reset_peak: bool = True) -> None:
        """Start measuring here; with ``reset_peak`` the resident peak starts here too."""
        status = memory_status()
        if "VmData" in status and "VmRSS" in status:
            self.start_data_bytes, self.start_resident_bytes = status["VmData"], status["VmRSS"]
            self.start_file_bytes = status.get("RssFile", 0)
            if "VmSize" in status:
                self.start_outside_data_bytes = status["VmSize"] - status["VmData"]
        if reset_peak:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # resets VmHWM to the current resident size
            except OSError:
                pass

    def current_bytes(self) -> int | None:
        """What the process holds now; None before :meth:`start` or where /proc says nothing."""
        status = memory_status()
        return self._as_data_bytes(status.get("VmRSS"), status)

    def peak_bytes(self) -> int | None:
        """The most the process held since :meth:`start`."""
        status = memory_status()
        estimate = self._as_data_bytes(status.get("VmHWM"), status)
        if estimate is None or self.start_outside_data_bytes is None or "VmPeak" not in status:
            return estimate
        return min(estimate, status["VmPeak"] - self.start_outside_data_bytes)

    def _as_data_bytes(self, resident_bytes: int | None, status: dict[str, int]) -> int | None:
        """A resident size read as the data segment ``RLIMIT_DATA`` compares with the budget."""
        if resident_bytes is None or self.start_data_bytes is None or self.start_resident_bytes is None:
            return None
        files_paged_in = max(0, status.get("RssFile", 0) - self.start_file_bytes)
        return self.start_data_bytes + max(0, resident_bytes - self.start_resident_bytes - files_paged_in)


def budget_as_given(memory_budget: str | int | MemoryBudget | None) -> str | None:
    """A memory budget as the user gave it, for messages: their own words, or the parsed budget's."""
    if memory_budget is None or isinstance(memory_budget, str):
        return memory_budget
    return str(MemoryBudget.parse(memory_budget))


def budget_below_load_error(
    task: str, backend: str, budget: str, budget_bytes: int, *, timeout: float = 600
) -> InvalidParameterError | None:
    """After loading failed under a CPU budget: the error to raise if the budget is what stopped it.

    What importing ``backend`` and loading ``task`` need is measured in a new process
    without a cap (a few seconds, and only once loading has failed). A budget below that
    is bad input, not an OOM of a trial: no trial could ever run under it. ``None`` when
    loading fits the budget, or cannot be measured: the failure is then the trial's own.
    """
    needed = _load_bytes(task, backend, timeout)
    if needed is None or needed <= budget_bytes:
        return None
    name = backend.rpartition(":")[2] or backend
    return InvalidParameterError(
        "memory_budget",
        budget,
        f"must exceed the {format_bytes(needed)} that {name} needs to import and load the task, before any training",
    )


def _load_bytes(task: str, backend: str, timeout: float) -> int | None:
    """The data segment of a new process, with no cap, once ``backend`` is imported and ``task`` loaded."""
    setup = json.dumps({**child_setup("cpu", None), "task": task, "backend": backend})
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE_COMMAND, setup],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ, **allocator_environment()},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else None


def _measure_load(setup_json: str) -> int:
    setup = json.loads(setup_json)
    enter_child(setup)
    from autobatch.core.registry import get_backend
    from autobatch.tasks.loading import load_task

    get_backend(setup["backend"])
    load_task(setup["task"])
    print(memory_status().get("VmData", ""), flush=True)
    return 0
