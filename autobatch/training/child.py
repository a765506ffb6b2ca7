"""The training process: :func:`main` in a new interpreter, started by :mod:`autobatch.training.supervisor`.

It caps its memory (:func:`autobatch.process.child.enter_child`), imports the framework,
configures and caps the device before the task can touch it, loads the task and asks the
backend for a :class:`~autobatch.backends.base.TrainingSession`; then
:class:`TrainingLoop` trains the windows of :func:`autobatch.training.api.plan_epochs` in order,
at the learning rate the task's ``lr_schedule`` gives each (over the whole run, as trials apply it
over theirs), writes checkpoints where an OOM could kill the process, evaluates, and writes the
model. Every step and every failure goes to the supervisor as one JSON event per line on its pipe.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from autobatch.core.adaptive import (
    MicroBatchController,
    MicroBatchOOMError,
    OptimizerStepOOMError,
    UnrecoverableOOMError,
)
from autobatch.core.config import TrialConfig
from autobatch.core.lr_schedule import LearningRateSchedule
from autobatch.errors import AutobatchError, first_line
from autobatch.process.child import CpuPeakMeter, enter_child
from autobatch.training.api import plan_epochs
from autobatch.training.result import TrainingError, TrainingOOMError, eval_oom_message

__all__ = ["CHECKPOINT_COST_RATIO", "TrainingLoop", "main"]

#: a checkpoint is written once the windows since the last one took this many times as long as writing it
CHECKPOINT_COST_RATIO = 20.0


def main(setup_path: str) -> int:
    """Train as ``setup_path`` says, reporting each event on the pipe it names; the exit code says how it ended."""
    with open(setup_path) as handle:
        setup = json.load(handle)
    enter_child(setup)  # before the framework is imported: the whole process counts, as in a trial
    channel = os.fdopen(setup["event_fd"], "w")

    def send(event: str, **fields) -> None:
        try:
            channel.write(json.dumps({"event": event, **fields}) + "\n")
            channel.flush()
        except BrokenPipeError:  # the supervisor is gone (kill -9): nobody reads on, or cleans up after us
            shutil.rmtree(setup["workdir"], ignore_errors=True)
            os._exit(1)

    backend = training = None
    loaded = False  # the framework imported and the task loaded
    try:
        from autobatch.core.registry import get_backend
        from autobatch.tasks.loading import load_task

        backend = get_backend(setup["backend"])  # imports the framework, under the cap
        budget_bytes = setup.get("memory_budget_bytes")
        # The device first, as in a trial: loading the task may run ops, after which TensorFlow
        # refuses a memory limit or growth. A setting that cannot be applied stops training here.
        backend.configure_device(setup["device"], budget_bytes)
        if budget_bytes and setup["device"] != "cpu":
            backend.apply_memory_cap(budget_bytes, setup["device"])
        workload = load_task(setup["task"])
        loaded = True
        training = TrainingLoop(setup, backend, workload, send)
        training.run()
        return 0
    except MicroBatchOOMError as error:
        send("failed", kind="oom", message=str(error), step=error.step, micro=error.micro_batch_size)
        return 3
    except OptimizerStepOOMError as error:
        send("failed", kind="optimizer_oom", message=str(error), step=error.step)
        return 3
    except UnrecoverableOOMError as error:  # a crash by other means: the parent resumes, or reports it
        send("failed", kind="crash_oom", message=str(error), detail=error.detail)
        return 3
    except TrainingOOMError as error:
        send("failed", kind="oom", message=str(error), step=error.step, micro=error.micro_batch_size)
        return 3
    except BaseException as error:  # noqa: BLE001 - every failure is reported
        oom = isinstance(error, MemoryError) or _safe_is_oom(training.session if training else backend, error)
        if oom:
            message = f"out of memory outside the training steps ({first_line(error)}); raise the memory budget"
        elif isinstance(error, AutobatchError):
            message = str(error)
        else:
            text = str(error).strip()
            message = f"{type(error).__name__}: {text.splitlines()[0] if text else ''} (--verbose shows the traceback)"
            sys.stderr.write("".join(traceback.format_exception(error)))
        send("failed", kind="oom" if oom else "error", message=message, loading=not loaded)
        return 3 if oom else 1


def _safe_is_oom(judge, error: BaseException) -> bool:
    """Whether the session (or, before there is one, the backend) calls ``error`` an OOM."""
    try:
        return judge is not None and bool(judge.is_oom(error))
    except Exception:
        return False


class TrainingLoop:
    """The training process's loop: windows in plan order, checkpoints, evaluation, the output."""

    def __init__(self, setup: dict, backend, workload, send):
        self.setup = setup
        self.backend = backend
        self.workload = workload
        self.send = send
        self.config = TrialConfig.from_dict(setup["config"])
        self.controller = MicroBatchController(
            self.config.micro_batch_size,
            max_micro_batch=setup["max_micro_batch"],
            grow_after=setup["grow_after"],
            adaptive=setup["adaptive"],
        )
        try:
            self.session = backend.training_session(
                workload,
                self.config,
                device=setup["device"],
                seed=setup["seed"],
                mixed_precision=setup["mixed_precision"],
                controller=self.controller,
            )
        except NotImplementedError as error:
            raise TrainingError(
                f"backend={setup['backend']!r} has no TrainingSession: it cannot train outside a trial"
            ) from error
        self.windows = plan_epochs(
            self.session.n_train,
            self.config.effective_batch_size,
            setup["epochs"],
            setup["seed"],
            setup["max_samples"],
        )
        self.checkpoint_every = setup.get("checkpoint_every")
        self.checkpointing = bool(
            setup["adaptive"] and (getattr(self.session, "crash_prone_oom", False) or self.checkpoint_every)
        )
        self.checkpoint_path = Path(setup["workdir"]) / "checkpoint"
        self._last_micro = self.controller.micro_batch_size
        lr_schedule = LearningRateSchedule.parse(getattr(workload, "lr_schedule", None))
        self.lr_schedule = None if lr_schedule.is_constant else lr_schedule  # None: the optimizer's own rate

    def run(self) -> None:
        on_cpu = self.setup["device"] == "cpu"
        # The peak as a trial measures it: the device allocator's, or on the CPU the process's.
        cpu_memory = CpuPeakMeter()
        baseline_bytes = None if on_cpu else self.session.current_memory_bytes()
        cpu_memory.start(reset_peak=on_cpu)
        if on_cpu:
            baseline_bytes = cpu_memory.start_data_bytes  # once the model is built, before training
        epochs = {epoch for epoch, _ in self.windows}
        self.send("ready", steps=len(self.windows), steps_per_epoch=math.ceil(len(self.windows) / max(1, len(epochs))))
        first = self._resume(self.setup["resume"]) if self.setup.get("resume") else 0
        self._hook_events()
        last_checkpoint_at, checkpoint_cost = time.perf_counter(), None
        for index in range(first, len(self.windows)):
            epoch, indices = self.windows[index]
            scheduled = self._schedule_learning_rate(index)
            started = time.perf_counter()
            loss = self.session.run_window(indices, epoch)
            seconds = time.perf_counter() - started
            micro = self._last_micro
            self.send(
                "window",
                step=index + 1,
                epoch=epoch,
                loss=float(loss),
                samples=len(indices),
                seconds=seconds,
                micro=micro,
                accumulation=math.ceil(len(indices) / micro),
                **scheduled,
            )
            now = time.perf_counter()
            if self.checkpoint_every:
                due = (index + 1) % self.checkpoint_every == 0
            else:  # as often as costs little: the training since the last one took 20 times as long
                due = checkpoint_cost is None or now - last_checkpoint_at >= CHECKPOINT_COST_RATIO * checkpoint_cost
            if self.checkpointing and index + 1 < len(self.windows) and due:
                checkpoint_cost = self._write_checkpoint(index + 1)
                last_checkpoint_at = time.perf_counter()
        self.send("trained")
        eval_batch, val_loss = self._evaluate()
        if self.setup["output"]:
            self._write_output(self.setup["output"])
        self.send(
            "result",
            val_loss=val_loss,
            eval_batch_size=eval_batch,
            samples_seen=self.controller.samples_seen,
            steps=self.controller.steps_done,
            micro_batch_size=self.controller.micro_batch_size,
            peak_memory_bytes=cpu_memory.peak_bytes() if on_cpu else self.session.peak_memory_bytes(),
            baseline_memory_bytes=baseline_bytes,
        )

    def _schedule_learning_rate(self, index: int) -> dict:
        """Set the rate window ``index`` trains at: from the windows done before it, so a resumed run
        (its optimizer's rate from a checkpoint) continues the schedule. The event's field that says it."""
        if self.lr_schedule is None:
            return {}
        multiplier = self.lr_schedule.multiplier(index / len(self.windows))
        self.session.scale_learning_rate(multiplier)
        return {"lr_multiplier": multiplier}

    def _hook_events(self) -> None:
        controller = self.controller

        def attempt(step: int, micro: int, window_size: int) -> None:
            self._last_micro = micro
            self.send("attempt", step=step, micro=micro, window_size=window_size, controller=controller.state_dict())

        controller.on_attempt = attempt
        controller.on_apply = lambda step: self.send("apply", step=step)
        controller.on_adaptation = lambda adaptation: self.send("adaptation", adaptation=adaptation.to_dict())

    def _resume(self, resume: dict) -> int:
        """Pick up where a crashed process was: the checkpoint, the windows after it again, the crashed window split."""
        if resume["checkpoint"]:
            self.session.load_checkpoint(resume["checkpoint"])
        done = resume["steps_done"]
        controller = self.controller
        controller.steps_done = done
        # A replayed window is not news, but the parent must know if one dies.
        controller.on_attempt = lambda step, micro, size: self.send(
            "attempt", step=step, micro=micro, window_size=size, replay=True, controller=controller.state_dict()
        )
        for offset, micro in enumerate(resume["replay"]):  # the same windows, at the sizes and rates they ran at
            epoch, indices = self.windows[done + offset]
            controller.micro_batch_size = micro
            self._schedule_learning_rate(done + offset)
            self.session.run_window(indices, epoch)
        controller.load_state_dict(resume["controller"])
        failed = resume["failed_step"]
        epoch, indices = self.windows[failed - 1]
        self._hook_events()
        controller.record_oom(failed, len(indices), resume["detail"], epoch=epoch, cause="crash")
        return failed - 1

    def _write_checkpoint(self, steps_done: int) -> float:
        started = time.perf_counter()
        partial = self.checkpoint_path.with_name("checkpoint.partial")
        self.session.save_checkpoint(str(partial))
        os.replace(partial, self.checkpoint_path)
        self.send("checkpoint", steps_done=steps_done, path=str(self.checkpoint_path))
        return time.perf_counter() - started

    def _evaluate(self) -> tuple[int, float]:
        """Validation loss; with ``adaptive`` an evaluation batch that runs out of memory is halved."""
        batch = self.setup["eval_batch_size"] or self.controller.micro_batch_size
        while True:
            try:
                return batch, float(self.session.evaluate(batch))
            except UnrecoverableOOMError as error:
                raise TrainingOOMError(eval_oom_message(batch, error.detail, adaptive=False)) from error
            except BaseException as error:
                if not _safe_is_oom(self.session, error):
                    raise
                detail = first_line(error)
                if not self.setup["adaptive"] or batch == 1:
                    raise TrainingOOMError(eval_oom_message(batch, detail, self.setup["adaptive"])) from error
            self.session.release()
            batch = max(1, batch // 2)

    def _write_output(self, output: str) -> None:
        """The model, under a temporary name in the same folder, renamed into place once complete."""
        final = Path(output)
        partial = final.with_name(f".partial-{os.getpid()}-{final.name}")
        try:
            self.session.save(str(partial))
            os.replace(partial, final)
        finally:
            if partial.exists():
                partial.unlink()
