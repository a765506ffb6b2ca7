"""The trial worker's child side: ``python -m autobatch.process.trial_child SETUP.json``.

It caps its own memory before importing a framework, imports the backend and loads
the task, then serves trials: it reads one request per line from its request pipe
and writes one :class:`TrialResult` as JSON per line to its result pipe.

Where the backend allows it (``Backend.fork_safe``), each trial runs in a process
forked from this one: a copy of a process that has paid the framework import and
the data load, but has run nothing yet. Every trial thus starts from the same clean
state, as a fresh process would, and its peak memory is its own; only the start-up
cost is shared. Otherwise this process runs one trial and exits. Every failure
becomes a result; a trial process that dies is reported by a ``died`` record with
its wait status, which the parent classifies.

A time-budgeted trial also writes an ``intermediate`` record per evaluation before its
last, then waits for one line back on the request pipe, ``{"prune": bool}``: the
parent holds the Optuna trial, so the pruner decides there (autobatch.core.schedule). The
server process waits for its fork meanwhile, so only the trial process reads that line.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback


def main(setup_path: str) -> int:
    started_at = time.perf_counter()
    with open(setup_path) as handle:
        setup = json.load(handle)
    budget_bytes = setup.get("memory_budget_bytes")
    if budget_bytes and setup["device"] == "cpu":
        # The whole process counts: the budget is what a trial may use in all.
        resource.setrlimit(resource.RLIMIT_DATA, (budget_bytes, budget_bytes))
    for entry in reversed(setup.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    requests = os.fdopen(setup["request_fd"], "r")
    results = os.fdopen(setup["result_fd"], "w")

    worker = _Worker(setup, _StudyLine(requests, results))
    worker.prepare()
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
        start_cost = {"worker_start": 0.0, "framework_import": 0.0, "task_load": 0.0}
    return 0


def _send(results, result, timings: dict) -> None:
    mode = timings.pop("worker_mode")
    result.timings.update(timings)
    result.extras["worker_mode"] = mode
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
        self.phase_path = setup["phase_path"]
        self.backend = None
        self.workload = None
        self.load_error: BaseException | None = None
        self.load_timings: dict[str, float] = {}
        self.clean_data_bytes: int | None = None  # VmData at the start of the trial
        self.start: int | None = None  # VmRSS at the start of the trial
        self.telemetry = None  # the running trial's TelemetrySampler, if any

    @property
    def fork_safe(self) -> bool:
        return self.load_error is None and bool(self.backend.fork_safe(self.device))

    def prepare(self) -> None:
        """Import the framework and load the task; a failure is reported by the first trial."""
        try:
            from autobatch.core.registry import get_backend
            from autobatch.tasks.workload import load_workload

            started = time.perf_counter()
            self.backend = get_backend(self.setup["backend"])
            self.load_timings["framework_import"] = time.perf_counter() - started
            started = time.perf_counter()
            self.workload = load_workload(self.setup["task"])
            self.load_timings["task_load"] = time.perf_counter() - started
        except BaseException as error:  # noqa: BLE001 - reported as the trial's result
            self.load_error = error

    def run(self, request: dict):
        from autobatch.core.config import TrialBudget, TrialConfig, TrialResult

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
            if self.load_error is not None:
                raise self.load_error
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
        result.telemetry = self._stop_telemetry()
        result.framework = getattr(self.backend, "name", None) or self.setup["backend"]
        result.device = self.device
        result.baseline_memory_bytes = baseline.get("bytes")
        # This process's own high-water mark. The parent's wait4 figure is no substitute: it
        # also counts the pages this process shared with its parent before exec.
        result.peak_resident_bytes = _memory_status().get("VmHWM")
        if self.backend is not None and self.device != "cpu":
            result.peak_memory_bytes = self.backend.peak_memory_bytes(self.device)
        elif result.peak_resident_bytes is not None and self.start is not None:
            result.peak_memory_bytes = self._as_data_bytes(result.peak_resident_bytes)
        return result

    # On the CPU, RLIMIT_DATA counts the data segment (VmData), which Linux keeps no
    # peak of; resident memory (VmRSS) has one (VmHWM) that can be reset. The two
    # differ by reservations never touched (thread arenas, BLAS buffers) and by
    # resident pages of mapped library files (TensorFlow's), a difference that holds
    # still while a trial runs. So a trial's peak is read as its data segment at the
    # start plus how far resident memory rose during the trial.

    def _note_start(self) -> None:
        """Record where this trial starts from, and start its peak there."""
        status = _memory_status()
        if "VmData" in status and "VmRSS" in status:
            self.clean_data_bytes, self.start = status["VmData"], status["VmRSS"]
        if self.device == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # resets VmHWM to the current resident size
            except OSError:
                pass
        else:
            self.backend.reset_peak_memory(self.device)

    def _as_data_bytes(self, resident_bytes: int) -> int:
        return self.clean_data_bytes + max(0, resident_bytes - self.start)

    def _mark_baseline(self, baseline: dict) -> None:
        current = self.backend.current_memory_bytes(self.device)
        if current is not None:
            baseline["bytes"] = current
            return
        resident = _memory_status().get("VmRSS")
        if resident is not None and self.start is not None:
            baseline["bytes"] = self._as_data_bytes(resident)

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
        with open(self.phase_path, "w") as handle:
            handle.write(phase)


def _start_telemetry(device: str):
    """A started :class:`TelemetrySampler` for this trial, or None (turned off, or it failed)."""
    try:
        from autobatch.process import telemetry

        if not telemetry.enabled():
            return None
        return telemetry.TelemetrySampler(device).start()
    except Exception:  # telemetry never fails a trial
        return None


def _memory_status() -> dict[str, int]:
    """VmData, VmRSS, VmHWM and friends from /proc/self/status, in bytes."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key.startswith("Vm"):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _process_start_time() -> float:
    """perf_counter() value at which this process started, from its age."""
    try:
        import psutil

        age = time.time() - psutil.Process().create_time()
        return time.perf_counter() - age
    except Exception:
        return time.perf_counter()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
