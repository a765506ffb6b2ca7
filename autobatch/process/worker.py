"""Run trials in a child process under a real memory budget.

The child (``python -m autobatch.process.trial_child``) sets ``RLIMIT_DATA`` to the budget
before importing any framework when it runs on the CPU, or asks the backend to cap
the device's allocator on a GPU. Whatever happens to it (an OOM, a signal, an
exception in user code, a trial over its time limit) comes back here as a
:class:`TrialResult`; the parent never crashes and never holds the child's memory.

A :class:`TrialWorker` keeps its child between trials, so the framework import and
the task's data load are paid once, not per trial: where the backend allows it, the
child forks a fresh copy of itself for each trial (see ``autobatch.process.trial_child``),
so every trial still starts from the same clean state and its peak is its own.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.errors import InvalidParameterError
from autobatch.core.memory import MemoryBudget
from autobatch.core.registry import backend_path

# Texts by which a child that died without writing its result shows it ran out of memory.
_OOM_SIGNATURES = (
    "can't allocate memory",
    "MemoryError",
    "std::bad_alloc",
    "ResourceExhaustedError",
    "OOM when allocating",
    "CUDA out of memory",
    "out of memory",
    "could not create a primitive",
)

_POLL_SECONDS = 0.02


def run_trial(
    task: str,
    backend: str,
    config: TrialConfig,
    *,
    memory_budget: "str | int | MemoryBudget | None" = None,
    budget: TrialBudget | None = None,
    device: str | None = None,
    timeout: float | None = None,
    verbose: bool = False,
) -> TrialResult:
    """Run ``config`` on ``task`` with ``backend`` in a fresh worker process and return its result.

    ``memory_budget`` is enforced for real (see module docstring); ``None`` means no
    cap. ``timeout`` (seconds) kills a trial that runs longer and reports ``timeout``.
    """
    with TrialWorker(task, backend, memory_budget=memory_budget, device=device, verbose=verbose) as worker:
        return worker.run(config, budget, timeout=timeout)


class TrialWorker:
    """A child process that runs trials of one task, backend, device and budget, one after another."""

    def __init__(
        self,
        task: str,
        backend: str,
        *,
        memory_budget: "str | int | MemoryBudget | None" = None,
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
        self.memory_budget_bytes = MemoryBudget.parse(memory_budget).resolve(device) if memory_budget is not None else None
        self._workdir = Path(tempfile.mkdtemp(prefix="autobatch-worker-"))
        self._process: subprocess.Popen | None = None
        self._requests = None
        self._results = None
        self._log = None

    def __enter__(self) -> "TrialWorker":
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
        """
        budget = budget or TrialBudget()
        if timeout is not None and not timeout > 0:
            raise InvalidParameterError("timeout", timeout, "must be a number of seconds > 0, or None")
        return self._run_once(config, budget, timeout, on_report)

    def close(self) -> None:
        """Stop the child (if any). The worker starts a new one on its next trial."""
        if self._process is not None:
            _kill(self._process)
            if self._process.returncode is None:
                try:
                    os.wait4(self._process.pid, 0)
                except ChildProcessError:
                    pass
                self._process.returncode = -9
        for handle in (self._requests, self._results, self._log):
            if handle is not None:
                handle.close()
        self._process = self._requests = self._results = self._log = None

    def __del__(self) -> None:
        try:
            self.close()
            shutil.rmtree(self._workdir, ignore_errors=True)
        except Exception:
            pass

    def _start(self) -> None:
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        setup = {
            "task": self.task,
            "backend": self.backend,
            "device": self.device,
            "memory_budget_bytes": self.memory_budget_bytes,
            "sys_path": [p for p in sys.path if p],
            "phase_path": str(self._workdir / "phase"),
            "fork": self.fork,
            "request_fd": request_read,
            "result_fd": result_write,
        }
        setup_path = self._workdir / "setup.json"
        setup_path.write_text(json.dumps(setup))
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter stays out of the log
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self._workdir / "log.txt", "wb")
        output = None if self.verbose else self._log
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "autobatch.process.trial_child", str(setup_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=env,
                pass_fds=(request_read, result_write),
                start_new_session=True,  # Ctrl-C reaches us, and we stop the child ourselves
            )
        finally:
            os.close(request_read)
            os.close(result_write)
        self._requests = os.fdopen(request_write, "w")
        self._results = os.fdopen(result_read, "r")

    def _run_once(self, config: TrialConfig, budget: TrialBudget, timeout: float | None, on_report=None) -> TrialResult:
        if self._process is None:
            self._start()
        log_offset = (self._workdir / "log.txt").stat().st_size
        (self._workdir / "phase").write_text("setup")
        started = time.perf_counter()
        try:
            self._requests.write(json.dumps({"config": config.to_dict(), "budget": budget.to_dict()}) + "\n")
            self._requests.flush()
        except BrokenPipeError:
            pass  # the child is gone already; waiting below tells how
        try:
            line, status, rusage, timed_out = self._wait_for_result(timeout, on_report)
        except BaseException:
            self.close()
            raise
        wall = time.perf_counter() - started

        log_tail = _tail(self._workdir / "log.txt", start=log_offset)
        record = json.loads(line) if line else {}
        if record and not record.get("died"):
            result = TrialResult.from_dict(record)
        else:
            if record:
                status = record["wait_status"]
                rusage_kib = record["maxrss_kib"]
            else:
                rusage_kib = rusage.ru_maxrss if rusage is not None else None
            phase = _read_phase(self._workdir / "phase")
            result = _result_without_report(config, status, timed_out, timeout, phase, log_tail)
            if rusage_kib is not None:
                # The trial died before it could report its own peak. wait4's figure may
                # also count pages shared with its parent: an upper bound.
                result.peak_resident_bytes = result.peak_memory_bytes = rusage_kib * 1024
        result.memory_budget_bytes = self.memory_budget_bytes
        result.timings["wall"] = wall
        if result.extras.get("worker_mode") != "fork":
            self.close()  # a child that ran the trial itself has exited, or is stopped now
        return result

    def _wait_for_result(self, timeout: float | None, on_report=None):
        """The child's result line, or how it ended without one: (line, status, rusage, timed_out).

        Intermediate losses on the way are answered (see :meth:`run`). The trial process
        waits for each answer, so nothing follows an intermediate line until it is sent.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        process = self._process
        while True:
            ready, _, _ = select.select([self._results], [], [], _POLL_SECONDS)
            if ready:
                line = self._results.readline()
                if line and not self._answered(line, on_report):
                    return line, None, None, False
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                line = self._results.readline()  # a result written just before exiting
                while line and _intermediate(line) is not None:  # it died waiting for an answer
                    line = self._results.readline()
                self._process = None
                return line, status, rusage, False
            if deadline is not None and time.monotonic() > deadline:
                _kill(process)
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
        try:
            self._requests.write(json.dumps({"prune": prune}) + "\n")
            self._requests.flush()
        except BrokenPipeError:
            pass  # the trial died meanwhile; waiting tells how
        return True


def _intermediate(line: str) -> dict | None:
    """The ``intermediate`` record of a result-pipe line, or None for a final one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("intermediate") if isinstance(record, dict) else None


def _kill(process: subprocess.Popen) -> None:
    """Kill the child and anything it started (data-loader workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result_without_report(
    config: TrialConfig, status: int, timed_out: bool, timeout: float | None, phase: str, log_tail: str
) -> TrialResult:
    """Classify a child that ended without writing its result."""
    if timed_out:
        return TrialResult(status="timeout", config=config, error=f"trial exceeded its time limit of {timeout:g} s")
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        oom = any(sig in log_tail for sig in _OOM_SIGNATURES)
        reason = f"worker killed by {name}"
        if number == signal.SIGKILL:
            reason += " (by the kernel's OOM killer, or by another process)"
        if oom:
            return TrialResult(status="oom", config=config, oom_phase=phase, error=f"{reason}: {_last_line(log_tail)}")
        return TrialResult(status="error", config=config, error=reason + (f": {_last_line(log_tail)}" if log_tail else ""))
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if any(sig in log_tail for sig in _OOM_SIGNATURES):
        return TrialResult(status="oom", config=config, oom_phase=phase, error=_last_line(log_tail))
    detail = _last_line(log_tail) or "no output"
    return TrialResult(status="error", config=config, error=f"worker exited with code {code} without a result: {detail}")


def _read_phase(phase_path: Path) -> str:
    try:
        return phase_path.read_text().strip() or "setup"
    except OSError:
        return "setup"


def _tail(path: Path, start: int = 0, limit: int = 4000) -> str:
    """The end of what the child logged since offset ``start``."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
