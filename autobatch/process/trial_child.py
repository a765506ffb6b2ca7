"""The trial worker's child side: :func:`main` in a new interpreter, given its request pipe.

Its first line on the request pipe is its setup. It caps its own memory before importing a
framework (:func:`autobatch.process.child.enter_child`), imports the backend, configures the
device before anything can touch it (``Backend.configure_device``: TensorFlow's memory limit
or growth; a setting that cannot be applied fails every trial with its reason), loads the
task, then serves trials: it reads one request per line from its request pipe and writes
one :class:`TrialResult` as JSON per line to its result pipe. Where it is (loading, then a
trial's phase) it writes into its phase file, for the parent to read if it dies.

Where the backend allows it (``Backend.fork_safe``: not once loading the task initialised
CUDA), each trial runs in a process forked from this one: a copy of a process that has paid
the framework import and the data load, but has run nothing yet. A backend whose runtime a
fork does not survive once the task's factory ran an op (TensorFlow: ``loads_task_in_trial``)
has each forked trial load the task itself. Every trial thus starts
from the same clean state, as a fresh process would, and its peak memory is its own; only
the start-up cost is shared. Otherwise this process runs one trial and exits. Every failure
becomes a result; a trial process that dies is reported by a ``died`` record with
its wait status, which the parent classifies. A result whose trial could not start because
the framework or the task failed to load says so (``extras["load_failed"]``): under a
budget too small to load in, no trial could ever run, and the parent says that instead.

A time-budgeted trial also writes an ``intermediate`` record per evaluation before its
last, then waits for one line back on the request pipe, ``{"prune": bool}``: the
parent holds the Optuna trial, so the pruner decides there (autobatch.core.schedule). The
server process waits for its fork meanwhile, so only the trial process reads that line.
Once the parent is gone (its end of the pipes closed), the child stops.
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from typing import TYPE_CHECKING

from autobatch.process.child import (
    CpuPeakMeter,
    allocator_setting,
    die_with_parent,
    enter_child,
    memory_status,
    thread_stack_bytes,
)

if TYPE_CHECKING:
    from autobatch.backends.base import Backend
    from autobatch.tasks.loading import Task

#: the phase of a child that is still importing the framework and loading the task
LOAD_PHASE = "load"
_PHASE_BYTES = 32


def main(request_fd: str) -> int:
    """Serve trials from the request pipe ``request_fd`` (a number) until the parent closes it."""
    started_at = time.perf_counter()
    requests = os.fdopen(int(request_fd), "r")
    setup = json.loads(requests.readline() or "{}")
    if not setup:
        return 0  # the parent went away before it sent the setup
    enter_child(setup)
    results = os.fdopen(setup["result_fd"], "w")
    try:
        return _serve(setup, requests, results, started_at)
    except BrokenPipeError:
        return 0  # the parent is gone: nobody is waiting for a result


def write_phase(phase_fd: int, phase: str) -> None:
    """Say where the trial is, in place: the file is shared with the parent and with forked trials."""
    os.pwrite(phase_fd, phase.encode().ljust(_PHASE_BYTES), 0)


def read_phase(phase_fd: int) -> str:
    try:
        return os.pread(phase_fd, _PHASE_BYTES, 0).decode(errors="replace").strip() or "setup"
    except OSError:
        return "setup"


def _serve(setup: dict, requests, results, started_at: float) -> int:
    worker = _Worker(setup, _StudyLine(requests, results))
    worker.prepare()
    write_phase(setup["phase_fd"], "setup")
    fork = setup.get("fork", True) and worker.fork_safe
    start_cost = {"worker_start": started_at - _process_start_time(), **worker.load_timings}
    for line in requests:
        request = json.loads(line)
        if "config" not in request:
            continue  # an answer to an intermediate loss that reached a trial process no longer there
        if not fork:
            _send(results, worker.run(request), {**start_cost, "worker_mode": "fresh"})
            return 0  # one trial per process
        pid = os.fork()
        if pid == 0:  # the trial process
            die_with_parent()
            code = 1
            try:
                _send(results, worker.run(request), {**start_cost, "worker_mode": "fork"})
                code = 0
            finally:
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            results.write(json.dumps({"died": True, "wait_status": status, "maxrss_kib": usage.ru_maxrss}) + "\n")
            results.flush()
        # Later trials reuse the import and the data load: their start-up costs only the fork.
        # (A task each trial loads itself keeps its own load time.)
        start_cost = {"worker_start": 0.0, "framework_import": 0.0}
        if worker.workload is not None:
            start_cost["task_load"] = 0.0
    return 0


def _send(results, result, timings: dict) -> None:
    mode = timings.pop("worker_mode")
    result.timings.update(timings)
    result.extras["worker_mode"] = mode
    result.extras["allocator"] = allocator_setting()  # what the peak, and so the wall, was measured under
    result.extras["thread_stack_bytes"] = thread_stack_bytes()  # each thread's share of RLIMIT_DATA
    results.write(json.dumps(result.to_dict()) + "\n")
    results.flush()


class _StudyLine:
    """The trial process's line to the study: intermediate losses out, the pruner's answer back."""

    def __init__(self, requests, results):
        self.requests = requests
        self.results = results

    def report(self, step: int, val_loss: float, train_seconds: float) -> bool:
        record = {"step": step, "val_loss": val_loss, "train_seconds": train_seconds}
        self.results.write(json.dumps({"intermediate": record}) + "\n")
        self.results.flush()
        answer = self.requests.readline()
        if not answer:
            return True  # the study is gone: nothing is waiting for the rest of this trial
        return bool(json.loads(answer).get("prune"))


class _Worker:
    """Imports the backend and loads the task once; runs a trial from a request."""

    def __init__(self, setup: dict, study_line: _StudyLine | None = None):
        self.setup = setup
        self.study_line = study_line
        self.device = setup["device"]
        self.phase_fd = setup["phase_fd"]
        self.backend: Backend | None = None
        self.workload: Task | None = None
        self.load_error: BaseException | None = None
        self.device_error: BaseException | None = None  # the device could not be configured
        self.load_timings: dict[str, float] = {}
        self.memory = CpuPeakMeter()  # started where the trial starts
        self.telemetry = None  # the running trial's TelemetrySampler, if any

    @property
    def fork_safe(self) -> bool:
        if self.load_error is not None or self.device_error is not None or self.backend is None:
            return False
        return bool(self.backend.fork_safe(self.device))

    def prepare(self) -> None:
        """Import the framework, configure the device, load the task; a failure is reported by the first trial."""
        try:
            from autobatch.core.registry import get_backend

            started = time.perf_counter()
            self.backend = get_backend(self.setup["backend"])
            self.load_timings["framework_import"] = time.perf_counter() - started
            try:  # first: loading the task may run ops, after which TensorFlow refuses device settings
                self.backend.configure_device(self.device, self.setup.get("memory_budget_bytes"))
            except Exception as error:
                self.device_error = error
                return
            if self.backend.loads_task_in_trial(self.device) and self.setup.get("fork", True):
                return  # each forked trial loads it (Backend.loads_task_in_trial): see load_task_here
            self.load_task_here()
        except BaseException as error:  # noqa: BLE001 - reported as the trial's result
            self.load_error = error

    def load_task_here(self) -> None:
        """Load the task in this process (the worker, or a trial forked before any load)."""
        from autobatch.tasks.loading import load_task

        assert self.backend is not None
        started = time.perf_counter()
        try:
            with self.backend.task_loading():  # as trials may fork after it (Backend.fork_safe)
                self.workload = load_task(self.setup["task"])
        except BaseException as error:  # noqa: BLE001 - reported as the trial's result
            self.load_error = error
        self.load_timings["task_load"] = time.perf_counter() - started

    def run(self, request: dict):
        from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
        from autobatch.core.memory import budget_coverage

        config = TrialConfig.from_dict(request["config"])
        budget = TrialBudget.from_dict(request["budget"])
        baseline: dict[str, int] = {}
        timings: dict[str, float] = {}
        progress = None
        self.telemetry = _start_telemetry(self.device)  # before the trial's start is noted: its thread is baseline
        try:
            from autobatch.core.schedule import ReportingProgress

            progress = ReportingProgress(
                self._report,
                on_phase=self._write_phase,
                on_baseline=lambda: self._mark_baseline(baseline),
            )
            progress.phase = "setup"
            if self.device_error is not None:
                raise self.device_error
            if self.workload is None and self.load_error is None and self.backend is not None:
                self.load_task_here()  # deferred to the trial: loading it in the worker would spoil the fork
                timings["task_load"] = self.load_timings["task_load"]
            if self.load_error is not None:
                raise self.load_error
            assert self.backend is not None and self.workload is not None
            budget_bytes = self.setup.get("memory_budget_bytes")
            if budget_bytes and self.device != "cpu":
                self.backend.apply_memory_cap(budget_bytes, self.device)
            self._note_start()
            trial_started = time.perf_counter()
            measured = self.backend.run_trial(self.workload, config, budget, self.device, progress)
            timings["trial"] = time.perf_counter() - trial_started
            extras = dict(measured.extras)
            noise = extras.pop("gradient_noise", None) or {}
            result = TrialResult(
                status="ok",
                config=config,
                samples_per_second=measured.samples_per_second,
                val_loss=measured.val_loss,
                samples_trained=measured.samples_trained,
                steps_timed=measured.steps_timed,
                extras=extras,
                timings={**timings, **measured.timings},
                noise_scale=noise.get("b_simple"),
                gradient_noise=noise,
                intermediate_losses=extras.pop("intermediate_losses", None) or [],
                pruned=bool(extras.pop("pruned", False)),
            )
        except BaseException as error:  # noqa: BLE001 - every failure becomes a result
            self._stop_telemetry()
            is_oom = isinstance(error, MemoryError) or self._is_oom(error)
            message = f"{type(error).__name__}: {error}".strip()
            detail = message if is_oom else message + "\n" + "".join(traceback.format_exception(error)[-6:])
            phase = progress.phase if progress is not None else "setup"
            del error
            gc.collect()  # let go of what the failed step held before building the report
            result = TrialResult(
                status="oom" if is_oom else "error",
                config=config,
                oom_phase=phase if is_oom else None,
                error=detail[:4000],
                timings=timings,
            )
        if self.load_error is not None:
            result.extras["load_failed"] = True
        result.telemetry = self._stop_telemetry()
        result.framework = getattr(self.backend, "name", None) or self.setup["backend"]
        result.device = self.device
        result.baseline_memory_bytes = baseline.get("bytes")
        # This process's own high-water mark. The parent's wait4 figure is no substitute: it
        # also counts the pages this process shared with its parent before exec.
        result.peak_resident_bytes = memory_status().get("VmHWM")
        result.memory_budget_covers = budget_coverage(result.framework, self.device)
        if self.backend is not None and self.device != "cpu":
            self._count_device_memory(result)
        else:
            result.peak_memory_bytes = self.memory.peak_bytes()
        return result

    def _count_device_memory(self, result) -> None:
        """The peak on an accelerator: the allocator's, plus what the process holds outside it.

        The CUDA context, kernels and library workspaces lie outside the allocator the cap
        governs, and can grow during the trial (kernels load as they are first used): what
        they hold at the end counts against the budget too. A trial whose sum exceeds the
        budget would not fit a device of that size: it is out of memory, as if it had failed.
        """
        from autobatch.core.memory import over_budget_text

        assert self.backend is not None
        allocator_peak = self.backend.peak_memory_bytes(self.device)
        overhead = self._device_overhead() if allocator_peak is not None else None
        result.allocator_peak_bytes = allocator_peak
        result.device_overhead_bytes = overhead
        result.peak_memory_bytes = None if allocator_peak is None else allocator_peak + (overhead or 0)
        budget_bytes = self.setup.get("memory_budget_bytes")
        if result.status == "ok" and budget_bytes and overhead is not None and result.peak_memory_bytes > budget_bytes:
            result.status, result.oom_phase = "oom", "train"
            result.error = over_budget_text(allocator_peak, overhead, budget_bytes, self.device)

    def _device_overhead(self) -> int | None:
        """What the process holds on the device outside the allocator now; None if unmeasured (never fails)."""
        try:
            return self.backend.device_overhead_bytes(self.device) if self.backend is not None else None
        except Exception:
            return None

    def _note_start(self) -> None:
        """Record where this trial starts from, and start its peak there."""
        self.memory.start(reset_peak=self.device == "cpu")
        if self.device != "cpu" and self.backend is not None:
            self.backend.reset_peak_memory(self.device)

    def _mark_baseline(self, baseline: dict) -> None:
        current = self.backend.current_memory_bytes(self.device) if self.backend is not None else None
        if current is not None:
            current += self._device_overhead() or 0  # as the peak counts it
        else:
            current = self.memory.current_bytes()
        if current is not None:
            baseline["bytes"] = current

    def _is_oom(self, error: BaseException) -> bool:
        if self.backend is None:
            return False
        try:
            return bool(self.backend.is_oom(error))
        except Exception:
            return False

    def _stop_telemetry(self) -> dict:
        """The running sampler's summary (it stops once; later calls return the same)."""
        if self.telemetry is None:
            return {}
        try:
            return self.telemetry.stop()
        except Exception as error:  # telemetry never fails a trial
            return {"notes": [f"telemetry failed: {type(error).__name__}: {error}"]}

    def _report(self, step: int, val_loss: float, train_seconds: float) -> bool:
        if self.study_line is None:
            return False
        return self.study_line.report(step, val_loss, train_seconds)

    def _write_phase(self, phase: str) -> None:
        if self.telemetry is not None:
            self.telemetry.phase = phase
        write_phase(self.phase_fd, phase)


def _start_telemetry(device: str):
    """A started :class:`TelemetrySampler` for this trial, or None (turned off, or it failed)."""
    try:
        from autobatch.process import telemetry

        if not telemetry.enabled():
            return None
        return telemetry.TelemetrySampler(device).start()
    except Exception:  # telemetry never fails a trial
        return None


def _process_start_time() -> float:
    """perf_counter() value at which this process started, from its age."""
    try:
        import psutil

        age = time.time() - psutil.Process().create_time()
        return time.perf_counter() - age
    except Exception:
        return time.perf_counter()
