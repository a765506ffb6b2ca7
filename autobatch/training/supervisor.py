"""The calling side of :func:`autobatch.train`: it runs the training process, follows it, restarts it.

The training process (:mod:`autobatch.training.child`) reports each step as a JSON event on a
pipe; :class:`Supervisor` relays them as progress, keeps what the result needs, and when a
child dies of an OOM it cannot survive (TensorFlow on the CPU) starts a new one that resumes
from the last checkpoint, replaying the steps since at the sizes they ran at and redoing the
step that crashed at half the micro-batch. A child that stops for any other reason becomes a
:class:`TrainingError` with a reason in one line.
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

from autobatch.core.adaptive import Adaptation, describe_oom
from autobatch.core.config import TrialConfig
from autobatch.core.memory import format_bytes
from autobatch.process.child import budget_below_load_error, kill_process_group, last_line, log_tail, start_child
from autobatch.process.worker import OOM_SIGNATURES
from autobatch.training.result import TrainingError, TrainingOOMError, TrainResult, eval_oom_message

__all__ = ["DEFAULT_MAX_RESTARTS", "Supervisor"]

#: new processes started after OOM crashes (TensorFlow on the CPU) before training gives up
DEFAULT_MAX_RESTARTS = 8
_POLL_SECONDS = 0.05
_LOG_TAIL_BYTES = 20000  # enough of a dead child's log to find the line that says it ran out of memory


class Supervisor:
    """Runs the training child, relays its progress, resumes it after an OOM crash."""

    def __init__(self, setup: dict, *, on_event, verbose: bool, max_restarts: int):
        self.setup = setup
        self.on_event = on_event
        self.verbose = verbose
        self.max_restarts = max_restarts
        self.config = TrialConfig.from_dict(setup["config"])
        self.windows: dict[int, dict] = {}  # step -> the child's report of that window
        self.adaptations: list[Adaptation] = []
        self.checkpoint: dict | None = None
        self.restarts = 0
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.train_seconds = 0.0
        self.samples_done = 0  # in the windows reported so far
        self.timings: dict[str, float] = {}

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self.workdir = Path(tempfile.mkdtemp(prefix="autobatch-train-"))
        try:
            resume = None
            while True:
                child = _ChildRun(self, resume)
                child.run()
                if child.result is not None:
                    result = child.result
                    break
                resume = self._resume_or_raise(child)
                self.restarts += 1
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["wall"] = time.perf_counter() - started
        self.timings["train"] = self.train_seconds
        return self._result(result)

    def emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _resume_or_raise(self, child: _ChildRun) -> dict:
        """After a child died: the resume plan for the next one, or the error that ends training."""
        failure = child.failure
        if not child.ready and (failure is None or failure.get("loading")):
            self._refuse_budget_below_load()  # it could not even load: a budget too small says so first
        if failure is not None and failure["kind"] != "crash_oom":  # the child said why it stopped
            message = failure["message"]
            if failure["kind"] in ("oom", "optimizer_oom"):
                raise TrainingOOMError(message, step=failure.get("step"), micro_batch_size=failure.get("micro"))
            raise TrainingError(message)
        detail: str | None
        if failure is not None:  # an OOM the framework could not survive: as if the process had crashed
            detail = f"{failure['detail']}; the framework's runtime aborted"
        else:
            detail = child.oom_line() or self._silent_memory_death(child)
        attempt = child.last_attempt
        if detail is None:
            raise TrainingError(f"the training process {child.how_it_ended()}{_suffix(child.last_log_line())}")
        if child.trained:
            batch = self.setup["eval_batch_size"] or (attempt["micro"] if attempt else self.config.micro_batch_size)
            raise TrainingOOMError(eval_oom_message(batch, detail, False))
        if attempt is not None and attempt["step"] in self.windows:
            raise TrainingOOMError(
                f"out of memory between training steps, after step {attempt['step']} ({detail}); "
                "raise the memory budget"
            )
        if attempt is None:
            raise TrainingOOMError(
                f"out of memory before training started, while loading the framework, the data and the model "
                f"({detail}); raise the memory budget"
            )
        if attempt.get("replay"):
            raise TrainingOOMError(
                f"out of memory at step {attempt['step']} while redoing the steps since the last checkpoint, at the "
                f"micro-batch of {attempt['micro']} that had fitted before ({detail}); raise the memory budget",
                step=attempt["step"],
                micro_batch_size=attempt["micro"],
            )
        step, micro, window_size = attempt["step"], attempt["micro"], attempt["window_size"]
        if child.applying == step and child.windows_done == 0:
            detail = f"{detail}, in the process's first optimizer step"
        # The first optimizer step of a process also builds the optimizer's state and traces the
        # step, on a heap the window's micro-batches left fragmented: smaller micro-batches leave
        # more room, so only an OOM in a later optimizer step means the step itself cannot fit.
        if child.applying == step and child.windows_done > 0:
            raise TrainingOOMError(
                f"out of memory in the optimizer step of step {step} ({detail}); the step cannot be redone by "
                "splitting micro-batches: the optimizer needs the memory; raise the memory budget",
                step=step,
            )
        min_micro = 1
        if not self.setup["adaptive"] or micro <= min_micro:
            raise TrainingOOMError(
                describe_oom(
                    step, micro, window_size, detail, adaptive=self.setup["adaptive"], min_micro_batch=min_micro
                ),
                step=step,
                micro_batch_size=micro,
            )
        if self.restarts >= self.max_restarts:
            raise TrainingOOMError(
                f"out of memory at step {step} in a micro-batch of {micro} samples ({detail}), and the training "
                f"process has been restarted {self.restarts} times already; raise the memory budget",
                step=step,
                micro_batch_size=micro,
            )
        done = self.checkpoint["steps_done"] if self.checkpoint else 0
        replay = [self.windows[s]["micro"] for s in range(done + 1, step)]
        self.emit(
            {"event": "restart", "step": step, "from_step": done + 1, "detail": detail, "how": child.how_it_ended()}
        )
        return {
            "checkpoint": self.checkpoint["path"] if self.checkpoint else None,
            "steps_done": done,
            "replay": replay,
            "controller": attempt["controller"],
            "failed_step": step,
            "detail": detail,
        }

    def _refuse_budget_below_load(self) -> None:
        """Raise if a CPU budget is below what importing the framework and loading the task need."""
        budget_bytes = self.setup.get("memory_budget_bytes")
        if self.setup["device"] != "cpu" or not budget_bytes:
            return
        error = budget_below_load_error(
            self.setup["task"], self.setup["backend"], self.setup["memory_budget"], budget_bytes
        )
        if error is not None:
            raise error

    def _silent_memory_death(self, child: _ChildRun) -> str | None:
        """A crash with nothing logged, mid-window under the budget: taken as out of memory.

        Under ``RLIMIT_DATA`` a failed allocation in TensorFlow's C++ kernels sometimes
        dereferences the null it got back instead of reporting it, so the process dies of
        SIGSEGV (or SIGBUS/SIGABRT) without a word. Only a death inside a training window
        of a budgeted run counts; anything else stays an error. A real bug that crashes
        there is not hidden for long: each retry halves the micro-batch, and the restarts
        are capped.
        """
        budget = self.setup.get("memory_budget_bytes")
        attempt = child.last_attempt
        crash_signals = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT}
        if budget is None or attempt is None or child.trained or child.status is None or child.status >= 0:
            return None
        if -child.status not in crash_signals:
            return None
        return (
            f"the training process {child.how_it_ended()} with nothing logged, in a micro-batch of "
            f"{attempt['micro']} under the memory budget of {format_bytes(budget)}: taken as out of memory"
        )

    def _result(self, final: dict) -> TrainResult:
        steps = sorted(self.windows)
        loss_sums: dict[int, float] = {}
        sample_counts: dict[int, int] = {}
        for step in steps:
            window = self.windows[step]
            loss_sums[window["epoch"]] = loss_sums.get(window["epoch"], 0.0) + window["loss"] * window["samples"]
            sample_counts[window["epoch"]] = sample_counts.get(window["epoch"], 0) + window["samples"]
        losses = [loss_sums[epoch] / sample_counts[epoch] for epoch in sorted(loss_sums)]  # sample-weighted means
        samples = final["samples_seen"]
        return TrainResult(
            task=self.setup["task"],
            backend=self.setup["backend"],
            device=self.setup["device"],
            config=self.config,
            epochs=self.setup["epochs"],
            adaptive=self.setup["adaptive"],
            val_loss=final["val_loss"],
            train_loss=losses[-1] if losses else None,
            epoch_losses=losses,
            samples_per_second=samples / self.train_seconds if self.train_seconds > 0 else None,
            samples_seen=samples,
            steps=final["steps"],
            effective_batch_sizes=sorted({self.windows[s]["samples"] for s in steps}),
            adaptations=list(self.adaptations),
            final_micro_batch_size=final["micro_batch_size"],
            max_micro_batch_size=self.setup["max_micro_batch"],
            eval_batch_size=final["eval_batch_size"],
            memory_budget_bytes=self.setup["memory_budget_bytes"],
            peak_memory_bytes=final.get("peak_memory_bytes"),
            baseline_memory_bytes=final.get("baseline_memory_bytes"),
            restarts=self.restarts,
            output=self.setup["output"],
            study_name=self.setup["study_name"],
            timings={**self.timings, **{k: v for k, v in final.get("timings", {}).items() if k not in self.timings}},
        )


class _ChildRun:
    """One training process: started, followed event by event, and ended."""

    def __init__(self, supervisor: Supervisor, resume: dict | None):
        self.supervisor = supervisor
        self.resume = resume
        self.result: dict | None = None
        self.failure: dict | None = None
        self.last_attempt: dict | None = None
        self.applying: int | None = None
        self.windows_done = 0  # optimizer steps this process has taken, replayed ones included
        self.ready = False  # the framework, the task and the model are loaded; training starts
        self.trained = False  # training finished; evaluation (or writing the model) is under way
        self.status: int | None = None
        number = supervisor.restarts
        self.log_path = supervisor.workdir / f"log-{number}.txt"
        self.setup_path = supervisor.workdir / f"setup-{number}.json"
        self._training_since: float | None = None
        self._eval_since: float | None = None

    def run(self) -> None:
        read_fd, write_fd = os.pipe()
        setup = {
            **self.supervisor.setup,
            "event_fd": write_fd,
            "workdir": str(self.supervisor.workdir),
            "resume": self.resume,
        }
        self.setup_path.write_text(json.dumps(setup))
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            try:
                process = start_child(
                    "autobatch.training.child:main", str(self.setup_path), output=log, pass_fds=(write_fd,)
                )
            finally:
                os.close(write_fd)
        try:
            self._follow(process, read_fd, started)
        except BaseException:
            kill_process_group(process)
            raise
        finally:
            os.close(read_fd)
            if process.poll() is None:
                kill_process_group(process)
                process.wait()
            if self._training_since is not None:  # died while training: the lost time counts too
                self.supervisor.train_seconds += time.perf_counter() - self._training_since
        self.status = process.returncode

    def _follow(self, process: subprocess.Popen, read_fd: int, started: float) -> None:
        buffer = b""
        log_offset = 0
        while True:
            ready, _, _ = select.select([read_fd], [], [], _POLL_SECONDS)
            chunk = os.read(read_fd, 1 << 16) if ready else b""
            if ready and not chunk:  # the child closed its end: it has exited, or is exiting
                process.wait()
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self._handle(json.loads(line), started)
            if self.supervisor.verbose:
                log_offset = _echo_log(self.log_path, log_offset)
            if not ready and process.poll() is not None:
                break
        if self.supervisor.verbose:
            _echo_log(self.log_path, log_offset)

    def _handle(self, event: dict, started: float) -> None:
        supervisor = self.supervisor
        kind = event["event"]
        now = time.perf_counter()
        if kind == "ready":
            self.ready = True
            supervisor.total_steps = event["steps"]
            supervisor.steps_per_epoch = event["steps_per_epoch"]
            key = "restart_startup" if self.resume else "startup"
            supervisor.timings[key] = supervisor.timings.get(key, 0.0) + now - started
            self._training_since = now
        elif kind == "attempt":
            self.last_attempt = event
            self.applying = None
        elif kind == "apply":
            self.applying = event["step"]
        elif kind == "window":
            self.windows_done += 1
            supervisor.windows[event["step"]] = event
            supervisor.samples_done += event["samples"]
            samples = supervisor.samples_done
            elapsed = supervisor.train_seconds + (now - self._training_since if self._training_since else 0.0)
            supervisor.emit(
                {
                    **event,
                    "steps": supervisor.total_steps,
                    "epochs": supervisor.setup["epochs"],
                    "samples_per_second": samples / elapsed if elapsed > 0 else None,
                }
            )
        elif kind == "adaptation":
            adaptation = Adaptation.from_dict(event["adaptation"])
            supervisor.adaptations.append(adaptation)
            supervisor.emit({"event": "adaptation", **adaptation.to_dict()})
        elif kind == "checkpoint":
            supervisor.checkpoint = event
        elif kind == "trained":
            self.trained = True
            if self._training_since is not None:
                supervisor.train_seconds += now - self._training_since
                self._training_since = None
            supervisor.emit({"event": "evaluating"})
            self._eval_since = now
        elif kind == "result":
            supervisor.timings["eval"] = now - (self._eval_since or now)
            self.result = event
        elif kind == "failed":
            self.failure = event

    def oom_line(self) -> str | None:
        """The log line by which a child that died shows it ran out of memory, and how it ended; None if none."""
        lines = [line.strip() for line in log_tail(self.log_path, limit=_LOG_TAIL_BYTES).splitlines() if line.strip()]
        # TensorFlow's own words first ("OOM when allocating tensor with shape[...]"), then anything else.
        for signatures in (("OOM when allocating",), (*OOM_SIGNATURES, "could not create a memory object")):
            for line in reversed(lines):
                if any(signature in line for signature in signatures):
                    line = line.split("] ", 1)[-1] if line.startswith(("W0000", "E0000", "I0000")) else line
                    return f"{line[:250]}; the training process {self.how_it_ended()}"
        return None

    def last_log_line(self) -> str:
        return last_line(log_tail(self.log_path, limit=_LOG_TAIL_BYTES), limit=300)

    def how_it_ended(self) -> str:
        status = self.status
        if status is None:
            return "ended"
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            return f"was killed by {name}"
        return f"exited with code {status}"


def _suffix(line: str) -> str:
    return f": {line}" if line else ""


def _echo_log(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return offset
    if data:
        sys.stderr.write(data.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    return offset + len(data)
