"""Run trials in a child process under a real memory budget.

The child (``autobatch.process.trial_child``) sets ``RLIMIT_DATA`` to the budget
before importing any framework when it runs on the CPU, or asks the backend to cap
the device's allocator on a GPU. Whatever happens to it (an OOM, a signal, an
exception in user code, a trial over its time limit) comes back here as a
:class:`TrialResult`; the parent never crashes and never holds the child's memory.
A budget too small for the framework to import and the task to load is the one
exception: no trial can run under it, so it is bad input (:class:`InvalidParameterError`).

A :class:`TrialWorker` keeps its child between trials, so the framework import and
the task's data load are paid once, not per trial: where the backend allows it, the
child forks a fresh copy of itself for each trial (see ``autobatch.process.trial_child``),
so every trial still starts from the same clean state and its peak is its own.

The worker leaves nothing on disk, however it or its child ends (``kill -9`` included):
the child's setup goes down its request pipe, and its log and phase are files that have
no name in the temp folder (``tempfile.TemporaryFile``), gone with the last process that
holds them open.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

from autobatch._validation import Interval, check_param
from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.core.memory import MemoryBudget
from autobatch.core.registry import backend_path
from autobatch.process.child import (
    budget_as_given,
    budget_below_load_error,
    child_setup,
    kill_process_group,
    last_line,
    log_tail,
    start_child,
)
from autobatch.process.trial_child import LOAD_PHASE, read_phase, write_phase

__all__ = ["OOM_SIGNATURES", "TrialWorker", "run_trial"]

# Texts by which a child that died without writing its result shows it ran out of memory:
# the backends' own (backends/*/memory.py), as a dying process prints them.
OOM_SIGNATURES = (
    "can't allocate memory",
    "MemoryError",
    "std::bad_alloc",
    "ResourceExhaustedError",
    "OOM when allocating",
    "CUDA out of memory",
    "out of memory",
    "could not create a primitive",
    "could not create a memory object",
    "Dst tensor is not initialized",  # TensorFlow's copy to a GPU it could not allocate on (tensorflow#7025)
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",  # cuDNN 8; cuDNN 9 says which allocation:
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
)

# Under a CPU budget, a thread's stack is a mapping that RLIMIT_DATA counts: a runtime that cannot
# start a thread has run out of budget (TensorFlow's LLVM aborted so in a probe at 188 x 8 on
# synthetic-images under 1 GiB). Without a budget the same text means a limit on threads, not memory.
CPU_BUDGET_OOM_SIGNATURES = ("pthread_create failed", "Resource temporarily unavailable")

_POLL_SECONDS = 0.02
#: how long past a trial's time limit a child may take to import the framework and load the task
LOAD_ALLOWANCE_SECONDS = 600.0


def run_trial(
    task: Any,
    backend: str | None,
    config: TrialConfig,
    *,
    memory_budget: str | int | MemoryBudget | None = None,
    budget: TrialBudget | None = None,
    device: str | None = None,
    timeout: float | None = None,
    verbose: bool = False,
) -> TrialResult:
    """Run ``config`` on ``task`` with ``backend`` in a fresh worker process and return its result.

    ``memory_budget`` is enforced for real (see module docstring); ``None`` means no
    cap. ``timeout`` (seconds) kills a trial that runs longer and reports ``timeout``.
    ``task`` is a study name, an import path or a factory function; ``backend`` ``None`` runs it
    on its own framework (the task is then loaded here once to tell which).
    """
    from autobatch.tasks.loading import load_task, task_framework, task_path

    task = task_path(task)
    if backend is None:
        backend = task_framework(load_task(task), None)
    with TrialWorker(task, backend, memory_budget=memory_budget, device=device, verbose=verbose) as worker:
        return worker.run(config, budget, timeout=timeout)


class TrialWorker:
    """A child process that runs trials of one task, backend, device and budget, one after another."""

    def __init__(
        self,
        task: str,
        backend: str,
        *,
        memory_budget: str | int | MemoryBudget | None = None,
        device: str | None = None,
        verbose: bool = False,
        fork: bool = True,
    ):
        """``fork=False`` starts a new process for every trial (slower; for comparison)."""
        backend_path(backend)  # fail here, in the caller, on an unknown backend
        if device is None:
            from autobatch.core.devices import default_device

            device = default_device()
        self.task = task
        self.backend = backend
        self.device = device
        self.verbose = verbose
        self.fork = fork
        self.memory_budget = budget_as_given(memory_budget)  # for messages
        self.memory_budget_bytes = (
            MemoryBudget.parse(memory_budget).resolve(device) if memory_budget is not None else None
        )
        self._process: subprocess.Popen | None = None
        self._requests: IO[str] | None = None
        self._results: IO[str] | None = None
        self._log: IO[bytes] | None = None  # what the child prints
        self._phase: IO[bytes] | None = None  # where the running trial is (see trial_child.write_phase)

    def __enter__(self) -> TrialWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(
        self,
        config: TrialConfig,
        budget: TrialBudget | None = None,
        *,
        timeout: float | None = None,
        on_report: Callable[[int, float, float], bool] | None = None,
    ) -> TrialResult:
        """Run one trial; the child is started on first use and replaced when it ends.

        A time-budgeted trial (``budget.train_seconds``) reports its intermediate
        validation losses: ``on_report(step, val_loss, train_seconds)`` is called for
        each, here, and returning True stops the trial (pruned). Without it, trials go on.

        Raises :class:`InvalidParameterError` for a ``memory_budget`` under which the
        framework cannot even import and the task load: no trial could run under it.
        """
        budget = budget or TrialBudget()
        check_param("timeout", timeout, [Interval(float, 0, None, closed="neither", unit="seconds"), None])
        return self._run_once(config, budget, timeout, on_report)

    def close(self) -> None:
        """Stop the child (if any). The worker starts a new one on its next trial."""
        if self._process is not None:
            kill_process_group(self._process)
            if self._process.returncode is None:
                try:
                    os.wait4(self._process.pid, 0)
                except ChildProcessError:
                    pass
                self._process.returncode = -9
        for handle in (self._requests, self._results, self._log, self._phase):
            if handle is not None:
                handle.close()
        self._process = self._requests = self._results = self._log = self._phase = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _start(self) -> None:
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        self._log = tempfile.TemporaryFile(prefix="autobatch-worker-")
        self._phase = tempfile.TemporaryFile(prefix="autobatch-worker-")
        write_phase(self._phase.fileno(), LOAD_PHASE)
        setup = {
            **child_setup(self.device, self.memory_budget_bytes),
            "task": self.task,
            "backend": self.backend,
            "fork": self.fork,
            "result_fd": result_write,
            "phase_fd": self._phase.fileno(),
        }
        try:
            self._process = start_child(
                "autobatch.process.trial_child:main",
                str(request_read),
                output=None if self.verbose else self._log,
                pass_fds=(request_read, result_write, self._phase.fileno()),
            )
        finally:
            os.close(request_read)
            os.close(result_write)
        self._requests = os.fdopen(request_write, "w")
        self._results = os.fdopen(result_read, "r")
        self._send(setup)  # the child's first line: its setup

    def _send(self, message: dict) -> None:
        assert self._requests is not None
        try:
            self._requests.write(json.dumps(message) + "\n")
            self._requests.flush()
        except BrokenPipeError:
            pass  # the child is gone already; waiting for its result tells how

    def _run_once(self, config: TrialConfig, budget: TrialBudget, timeout: float | None, on_report=None) -> TrialResult:
        if self._process is None:
            self._start()  # its phase says it is loading until it has loaded
        elif self._phase is not None:
            write_phase(self._phase.fileno(), "setup")
        assert self._log is not None and self._phase is not None
        log_offset = os.fstat(self._log.fileno()).st_size
        started = time.perf_counter()
        self._send({"config": config.to_dict(), "budget": budget.to_dict()})
        try:
            line, status, rusage, timed_out = self._wait_for_result(timeout, on_report)
        except BaseException:
            self.close()
            raise
        wall = time.perf_counter() - started

        logged = log_tail(self._log, start=log_offset)
        phase = read_phase(self._phase.fileno())
        record = json.loads(line) if line else {}
        if record and not record.get("died"):
            result = TrialResult.from_dict(record)
            if result.extras.pop("load_failed", False):
                self._refuse_budget_below_load()
        else:
            if record:
                status = record["wait_status"]
                rusage_kib = record["maxrss_kib"]
            else:
                rusage_kib = rusage.ru_maxrss if rusage is not None else None
            if phase == LOAD_PHASE and not timed_out:
                self._refuse_budget_below_load()
            phase = "setup" if phase == LOAD_PHASE else phase
            cpu_budget = self.device == "cpu" and bool(self.memory_budget_bytes)
            result = _result_without_report(config, status, timed_out, timeout, phase, logged, cpu_budget=cpu_budget)
            if rusage_kib is not None:
                # The trial died before it could report its own peak. wait4's figure may
                # also count pages shared with its parent: an upper bound.
                result.peak_resident_bytes = result.peak_memory_bytes = rusage_kib * 1024
        result.memory_budget_bytes = self.memory_budget_bytes
        result.timings["wall"] = wall
        # A child that ran the trial itself has exited, or is stopped now. A forked trial that died
        # was reported by the child it was forked from, which is still there, loaded and untouched:
        # keeping it saves the next trial a framework import (TensorFlow: ~5 s after every OOM death).
        forked_trial_died = bool(record.get("died")) and not timed_out
        if result.extras.get("worker_mode") != "fork" and not forked_trial_died:
            self.close()
        return result

    def _refuse_budget_below_load(self) -> None:
        """After the child failed to load: raise if the CPU budget is below what loading needs."""
        if self.device != "cpu" or self.memory_budget is None or not self.memory_budget_bytes:
            return
        error = budget_below_load_error(self.task, self.backend, self.memory_budget, self.memory_budget_bytes)
        if error is not None:
            self.close()
            raise error

    def _wait_for_result(self, timeout: float | None, on_report=None):
        """The child's result line, or how it ended without one: (line, status, rusage, timed_out).

        Intermediate losses on the way are answered (see :meth:`run`). The trial process
        waits for each answer, so nothing follows an intermediate line until it is sent.
        """
        # The limit is the trial's own: it starts once the child has imported the framework and
        # loaded the task, which a new worker pays once for all its trials. A load that never ends
        # is still stopped, LOAD_ALLOWANCE_SECONDS past the limit.
        load_deadline = None if timeout is None else time.monotonic() + timeout + LOAD_ALLOWANCE_SECONDS
        deadline = None
        process, results, phase_file = self._process, self._results, self._phase
        assert process is not None and results is not None and phase_file is not None
        while True:
            if timeout is not None and deadline is None and read_phase(phase_file.fileno()) != LOAD_PHASE:
                deadline = time.monotonic() + timeout
            ready, _, _ = select.select([results], [], [], _POLL_SECONDS)
            if ready:
                line = results.readline()
                if line and not self._answered(line, on_report):
                    return line, None, None, False
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                line = results.readline()  # a result written just before exiting
                while line and _intermediate(line) is not None:  # it died waiting for an answer
                    line = results.readline()
                self._process = None
                return line, status, rusage, False
            limit = deadline if deadline is not None else load_deadline
            if limit is not None and time.monotonic() > limit:
                kill_process_group(process)
                _, status, rusage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                self._process = None
                return "", status, rusage, True

    def _answered(self, line: str, on_report) -> bool:
        """If ``line`` is an intermediate loss, send the trial its answer (prune or go on) and say so."""
        record = _intermediate(line)
        if record is None:
            return False
        prune = bool(on_report(record["step"], record["val_loss"], record["train_seconds"])) if on_report else False
        self._send({"prune": prune})  # a trial that died meanwhile: waiting tells how
        return True


def _intermediate(line: str) -> dict | None:
    """The ``intermediate`` record of a result-pipe line, or None for a final one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("intermediate") if isinstance(record, dict) else None


#: how a native allocation failure can kill a process without a word (see _result_without_report); an
#: abort is left out: it follows a message (std::bad_alloc is a signature, any other is not an OOM)
_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGBUS)


def _result_without_report(
    config: TrialConfig,
    status: int,
    timed_out: bool,
    timeout: float | None,
    phase: str,
    logged: str,
    *,
    cpu_budget: bool = False,
) -> TrialResult:
    """Classify a child that ended without writing its result.

    Under a CPU budget (``RLIMIT_DATA``) a kernel that gets NULL back from a failed
    allocation may use it rather than report it: TensorFlow's oneDNN kernels were seen
    to die of SIGSEGV with nothing logged, in about one trial in ten past the wall. Such a
    crash (SIGSEGV, SIGBUS) while training or evaluating under a CPU budget is taken as out
    of memory, as training's supervisor does, or a probe would stop at it as at a broken task.
    """
    if timed_out:
        return TrialResult(status="timeout", config=config, error=f"trial exceeded its time limit of {timeout:g} s")
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        oom = _logged_oom(logged, cpu_budget)
        reason = f"worker killed by {name}"
        if number == signal.SIGKILL:
            reason += " (by the kernel's OOM killer, or by another process)"
        if not oom and cpu_budget and number in _CRASH_SIGNALS and phase in ("train", "eval"):
            oom = True
            reason += (
                f" in {phase} under the CPU memory budget: taken as out of memory (a failed allocation in native code)"
            )
        if oom:
            return TrialResult(status="oom", config=config, oom_phase=phase, error=f"{reason}: {last_line(logged)}")
        return TrialResult(status="error", config=config, error=reason + (f": {last_line(logged)}" if logged else ""))
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if _logged_oom(logged, cpu_budget):
        return TrialResult(status="oom", config=config, oom_phase=phase, error=last_line(logged))
    detail = last_line(logged) or "no output"
    return TrialResult(
        status="error", config=config, error=f"worker exited with code {code} without a result: {detail}"
    )


def _logged_oom(logged: str, cpu_budget: bool) -> bool:
    """Whether what a dying child logged says it ran out of memory (thread creation counts under a CPU budget)."""
    if any(sig in logged for sig in OOM_SIGNATURES):
        return True
    return cpu_budget and all(sig in logged for sig in CPU_BUDGET_OOM_SIGNATURES)
