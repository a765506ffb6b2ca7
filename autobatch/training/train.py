"""Train a task with a study's recommended config (or a given one), optionally adapting the micro-batch.

:func:`train` is ``autobatch train`` in Python. The training runs in a child process
(``_child_main`` in a new interpreter), as a trial does, for three reasons:

- the memory budget is real: on the CPU the child sets ``RLIMIT_DATA`` to the budget
  before it imports the framework, so the whole process counts and an allocation
  past the budget fails (PyTorch raises ``DefaultCPUAllocator: can't allocate memory``,
  TensorFlow ``ResourceExhaustedError``); on a GPU the backend caps its allocator.
  The calling process imports no framework and is not capped;
- on the CPU, TensorFlow 2.21's oneDNN kernels often do not raise a recoverable OOM:
  the process dies (SIGSEGV, or SIGABRT on ``std::bad_alloc``) or the runtime aborts
  for good (``AbortedError``). With ``adaptive=True`` such a child writes checkpoints
  as it goes, and this process resumes training in a new child from the last one:
  the windows since the checkpoint are replayed at the sizes they ran at, and the
  window that crashed is redone at half the micro-batch, so the math is the same as
  for an OOM caught in-process (:mod:`autobatch.core.adaptive`);
- a crash, whatever its cause, becomes an error with a reason, and nothing is left
  half-written: the trained model is written to ``output`` only once training and
  evaluation have finished, under a temporary name renamed into place.

Each epoch is one seeded permutation of the training set (:class:`SampleStream`), cut
into windows of the effective batch (micro-batch × accumulation); the last window of
an epoch holds what is left. The effective batch, the learning rate and the sample
order do not depend on how the micro-batch adapts.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autobatch.core.adaptive import (
    DEFAULT_GROW_AFTER,
    Adaptation,
    MicroBatchController,
    MicroBatchOOMError,
    OptimizerStepOOMError,
    UnrecoverableOOMError,
    describe_oom,
    first_line,
)
from autobatch.core.config import TrialConfig
from autobatch.errors import AutobatchError, InvalidParameterError, StorageError
from autobatch.core.memory import MemoryBudget, format_bytes

#: new processes started after OOM crashes (TensorFlow on the CPU) before training gives up
DEFAULT_MAX_RESTARTS = 8
#: a checkpoint is written once the windows since the last one took this many times as long as writing it
CHECKPOINT_COST_RATIO = 20.0
#: model formats ``output`` may name, per framework (PyTorch: anything else is a ``torch.save`` state_dict)
TENSORFLOW_OUTPUTS = (".keras", ".weights.h5", ".npz")
_POLL_SECONDS = 0.05
# Not ``-m autobatch.training.train``: that would import this module twice (as itself and as __main__).
_CHILD_COMMAND = "import sys; from autobatch.training.train import _child_main; sys.exit(_child_main(sys.argv[1]))"


class TrainingError(AutobatchError):
    """Training stopped before it finished; the message says why, in one line."""


class TrainingOOMError(TrainingError):
    """Training ran out of memory and could not adapt (or was not asked to).

    ``step`` (1-based optimizer step) and ``micro_batch_size`` say where, when known.
    """

    def __init__(self, message: str, *, step: int | None = None, micro_batch_size: int | None = None):
        super().__init__(message)
        self.step = step
        self.micro_batch_size = micro_batch_size


@dataclass
class TrainResult:
    """What a training run did.

    ``config`` is the starting config; its effective batch is what every optimizer
    step trained on (``effective_batch_sizes`` lists the distinct sample counts of the
    steps: the effective batch, and a shorter last window of an epoch if the training
    set does not divide). ``adaptations`` lists every change of micro-batch with its
    step and cause. ``samples_per_second`` is over the training time, everything
    included (redone windows, restarts) but the start-up and the evaluation.
    ``restarts`` counts new processes started after OOM crashes. Memory figures are
    bytes, measured as for a trial: ``baseline_memory_bytes`` once the model is built,
    ``peak_memory_bytes`` the most the (last) training process used.
    """

    task: str
    backend: str
    device: str
    config: TrialConfig
    epochs: int
    adaptive: bool
    val_loss: float
    train_loss: float | None
    epoch_losses: list[float]
    samples_per_second: float | None
    samples_seen: int
    steps: int
    effective_batch_sizes: list[int]
    adaptations: list[Adaptation]
    final_micro_batch_size: int
    max_micro_batch_size: int
    eval_batch_size: int
    memory_budget_bytes: int | None
    peak_memory_bytes: int | None
    baseline_memory_bytes: int | None = None
    restarts: int = 0
    output: str | None = None
    study_name: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def effective_batch_size(self) -> int:
        return self.config.effective_batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "backend": self.backend,
            "device": self.device,
            "config": self.config.to_dict(),
            "effective_batch_size": self.effective_batch_size,
            "effective_batch_sizes": self.effective_batch_sizes,
            "epochs": self.epochs,
            "adaptive": self.adaptive,
            "val_loss": self.val_loss,
            "train_loss": self.train_loss,
            "epoch_losses": self.epoch_losses,
            "samples_per_second": self.samples_per_second,
            "samples_seen": self.samples_seen,
            "steps": self.steps,
            "adaptations": [adaptation.to_dict() for adaptation in self.adaptations],
            "final_micro_batch_size": self.final_micro_batch_size,
            "max_micro_batch_size": self.max_micro_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "baseline_memory_bytes": self.baseline_memory_bytes,
            "restarts": self.restarts,
            "output": self.output,
            "study_name": self.study_name,
            "timings": self.timings,
        }


def train(
    task: str,
    backend: str = "torch",
    *,
    micro_batch_size: int | None = None,
    accumulation_steps: int | None = None,
    learning_rate: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    epochs: int = 1,
    max_samples: int | None = None,
    adaptive: bool = False,
    max_micro_batch: int | None = None,
    grow_after: int | None = DEFAULT_GROW_AFTER,
    memory_budget: "str | int | MemoryBudget | None" = None,
    device: str | None = None,
    seed: int = 0,
    eval_batch_size: int | None = None,
    mixed_precision: bool = False,
    output: "str | os.PathLike | None" = None,
    on_event: Callable[[dict], None] | None = None,
    verbose: bool = False,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    checkpoint_every: int | None = None,
) -> TrainResult:
    """Train ``task`` for ``epochs`` epochs and measure its validation loss.

    The config is ``study_name``'s recommendation (from ``storage``, default
    ``sqlite:///autobatch.db``), or ``micro_batch_size`` × ``accumulation_steps``
    (default 1) at ``learning_rate`` (default: the task's base LR); not both. With
    ``adaptive=True`` a micro-batch that runs out of memory is split and its window
    redone (same effective batch, LR and sample order), and the size grows back after
    ``grow_after`` clean windows up to ``max_micro_batch`` (default: the study's memory
    wall, or the starting size); otherwise an OOM stops training with
    :class:`TrainingOOMError`. ``memory_budget`` (default: the study's budget, or none)
    is enforced for real in the training process. ``max_samples`` stops after that many
    samples. ``output`` receives the trained model (PyTorch: a ``state_dict``; Keras:
    ``.keras`` or ``.weights.h5``; either: ``.npz`` of every variable). ``on_event`` is
    called with each progress event (a dict with ``"event"``: ``window``,
    ``adaptation``, ``restart``, ``evaluating``).

    Where the framework dies of an OOM instead of raising it (TensorFlow on the CPU),
    an adaptive run writes checkpoints, whenever writing one costs under 5% of the
    training time since the last, or every ``checkpoint_every`` steps if given (which
    also turns them on for other frameworks), and resumes from the last one in a new
    process, at most ``max_restarts`` times.
    """
    setup = _prepare(
        task=task, backend=backend, micro_batch_size=micro_batch_size, accumulation_steps=accumulation_steps,
        learning_rate=learning_rate, study_name=study_name, storage=storage, epochs=epochs, max_samples=max_samples,
        adaptive=adaptive, max_micro_batch=max_micro_batch, grow_after=grow_after, memory_budget=memory_budget,
        device=device, seed=seed, eval_batch_size=eval_batch_size, mixed_precision=mixed_precision, output=output,
    )
    _require_int("max_restarts", max_restarts, minimum=0)
    if checkpoint_every is not None:
        _require_int("checkpoint_every", checkpoint_every)
    setup["checkpoint_every"] = checkpoint_every
    return _Supervisor(setup, on_event=on_event, verbose=verbose, max_restarts=max_restarts).run()


def plan_epochs(n_train: int, effective_batch_size: int, epochs: int, seed: int, max_samples: int | None = None) -> list[tuple[int, np.ndarray]]:
    """``(epoch, sample indices)`` of every window: one seeded permutation per epoch, cut into effective batches.

    The plan does not depend on the micro-batch, so a run that adapts and one that
    does not train on the same samples in the same order.
    """
    from autobatch.core.windows import SampleStream

    stream = SampleStream(n_train, seed=seed)
    remaining = max_samples if max_samples is not None else epochs * n_train
    windows = []
    for epoch in range(1, epochs + 1):
        order = stream.take(n_train)
        for start in range(0, n_train, effective_batch_size):
            if remaining <= 0:
                return windows
            indices = order[start : start + min(effective_batch_size, remaining)]
            windows.append((epoch, indices))
            remaining -= len(indices)
    return windows


# -- the calling side -------------------------------------------------------------------------------


def _prepare(**options) -> dict:
    """Validate the options and resolve the config: the child's setup."""
    from autobatch.core.registry import backend_path
    from autobatch.tasks.workload import load_workload

    task, backend = options["task"], options["backend"]
    backend_path(backend)  # an unknown backend fails here
    _require_int("epochs", options["epochs"])
    if options["max_samples"] is not None:
        _require_int("max_samples", options["max_samples"])
    if options["grow_after"] is not None:
        _require_int("grow_after", options["grow_after"])
    _require_int("seed", options["seed"], minimum=0)
    if options["eval_batch_size"] is not None:
        _require_int("eval_batch_size", options["eval_batch_size"])
    workload = load_workload(task)  # a task that does not load fails here, as bad input

    study_name = options["study_name"]
    memory_budget, device, mixed_precision = options["memory_budget"], options["device"], options["mixed_precision"]
    wall = None
    if study_name is not None:
        given = [name for name in ("micro_batch_size", "accumulation_steps", "learning_rate") if options[name] is not None]
        if given:
            raise InvalidParameterError(
                "study_name", study_name, f"give a study or a config ({', '.join(given)}), not both"
            )
        recommended, settings, wall = _study_config(study_name, options["storage"], task, backend)
        config = TrialConfig(
            recommended["micro_batch_size"], recommended["accumulation_steps"], recommended["learning_rate"]
        )
        if memory_budget is None:
            memory_budget = settings.get("memory_budget_bytes")  # the budget the recommendation was found under
        device = device or settings.get("device")
        mixed_precision = mixed_precision or bool(settings.get("trial_budget", {}).get("mixed_precision", False))
    else:
        if options["micro_batch_size"] is None:
            raise InvalidParameterError(
                "micro_batch_size", None, "give a micro-batch size, or a study to take the recommended config from"
            )
        config = TrialConfig(
            options["micro_batch_size"],
            1 if options["accumulation_steps"] is None else options["accumulation_steps"],
            workload.base_learning_rate if options["learning_rate"] is None else options["learning_rate"],
        )
    max_micro = options["max_micro_batch"]
    if max_micro is None:
        max_micro = max(config.micro_batch_size, wall or 0)
    else:
        _require_int("max_micro_batch", max_micro)
        if max_micro < config.micro_batch_size:
            raise InvalidParameterError(
                "max_micro_batch", max_micro, f"must be >= the micro-batch size {config.micro_batch_size}"
            )
    if device is None:
        from autobatch.core.devices import default_device

        device = default_device()
    budget_bytes = MemoryBudget.parse(memory_budget).resolve(device) if memory_budget is not None else None
    output = _check_output(options["output"], backend)
    return {
        "task": task,
        "backend": backend,
        "device": device,
        "config": config.to_dict(),
        "epochs": options["epochs"],
        "max_samples": options["max_samples"],
        "n_train": len(workload.y_train),
        "adaptive": bool(options["adaptive"]),
        "max_micro_batch": max_micro,
        "grow_after": options["grow_after"],
        "memory_budget_bytes": budget_bytes,
        "seed": options["seed"],
        "eval_batch_size": options["eval_batch_size"],
        "mixed_precision": bool(mixed_precision),
        "output": output,
        "study_name": study_name,
        "sys_path": [entry for entry in sys.path if entry],
    }


def _study_config(study_name: str, storage: str | None, task: str, backend: str) -> tuple[dict, dict, int]:
    from autobatch.search.study import DEFAULT_STORAGE, load_study_result

    result = load_study_result(storage or DEFAULT_STORAGE, study_name)
    settings = result.study.user_attrs.get("autobatch", {})
    for key, value in (("task", task), ("backend", backend)):
        if settings.get(key) not in (None, value):
            raise StorageError(
                f"study_name={study_name!r} was made for {key}={settings[key]!r}, not {value!r}; "
                f"train it with {key}={settings[key]!r}, or name a study made for {value!r}"
            )
    if result.recommended is None:
        raise StorageError(
            f"study_name={study_name!r} has no feasible trial to recommend yet; run more trials, "
            "or give the config (micro_batch_size, accumulation_steps, learning_rate)"
        )
    return result.recommended, settings, int(result.max_micro_batch or 0)


def _check_output(output, backend: str) -> str | None:
    if output is None:
        return None
    path = Path(output).expanduser().resolve()
    if path.is_dir():
        raise InvalidParameterError("output", str(output), "is a directory; name the file to write the model to")
    if not path.parent.is_dir():
        raise InvalidParameterError("output", str(output), f"its directory {str(path.parent)!r} does not exist")
    if backend == "tensorflow" and not path.name.endswith(TENSORFLOW_OUTPUTS):
        raise InvalidParameterError("output", str(output), f"a Keras model is written as {', '.join(TENSORFLOW_OUTPUTS)}")
    return str(path)


class _Supervisor:
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
                child = _Child(self, resume)
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

    def _resume_or_raise(self, child: "_Child") -> dict:
        """After a child died: the resume plan for the next one, or the error that ends training."""
        failure = child.failure
        if failure is not None and failure["kind"] != "crash_oom":  # the child said why it stopped
            message = failure["message"]
            if failure["kind"] in ("oom", "optimizer_oom"):
                raise TrainingOOMError(message, step=failure.get("step"), micro_batch_size=failure.get("micro"))
            raise TrainingError(message)
        if failure is not None:  # an OOM the framework could not survive: as if the process had crashed
            detail = f"{failure['detail']}; the framework's runtime aborted"
        else:
            detail = child.oom_line() or self._silent_memory_death(child)
        attempt = child.last_attempt
        if detail is None:
            raise TrainingError(f"the training process {child.how_it_ended()}{_suffix(child.last_log_line())}")
        if child.trained:
            raise TrainingOOMError(_eval_oom_message(self.setup["eval_batch_size"] or attempt["micro"], detail, False))
        if attempt is not None and attempt["step"] in self.windows:
            raise TrainingOOMError(f"out of memory between training steps, after step {attempt['step']} ({detail}); "
                                   "raise the memory budget")
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
                describe_oom(step, micro, window_size, detail, adaptive=self.setup["adaptive"], min_micro_batch=min_micro),
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
        self.emit({"event": "restart", "step": step, "from_step": done + 1, "detail": detail, "how": child.how_it_ended()})
        return {
            "checkpoint": self.checkpoint["path"] if self.checkpoint else None,
            "steps_done": done,
            "replay": replay,
            "controller": attempt["controller"],
            "failed_step": step,
            "detail": detail,
        }

    def _silent_memory_death(self, child: "_Child") -> str | None:
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


class _Child:
    """One training process: started, followed event by event, and ended."""

    def __init__(self, supervisor: _Supervisor, resume: dict | None):
        self.supervisor = supervisor
        self.resume = resume
        self.result: dict | None = None
        self.failure: dict | None = None
        self.last_attempt: dict | None = None
        self.applying: int | None = None
        self.windows_done = 0  # optimizer steps this process has taken, replayed ones included
        self.trained = False  # training finished; evaluation (or writing the model) is under way
        self.status: int | None = None
        number = supervisor.restarts
        self.log_path = supervisor.workdir / f"log-{number}.txt"
        self.setup_path = supervisor.workdir / f"setup-{number}.json"
        self._training_since: float | None = None
        self._eval_since: float | None = None

    def run(self) -> None:
        read_fd, write_fd = os.pipe()
        setup = {**self.supervisor.setup, "event_fd": write_fd, "workdir": str(self.supervisor.workdir), "resume": self.resume}
        self.setup_path.write_text(json.dumps(setup))
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env.setdefault("PYTHONUNBUFFERED", "1")
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-c", _CHILD_COMMAND, str(self.setup_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # Ctrl-C reaches us; we stop the child ourselves
                )
            finally:
                os.close(write_fd)
        try:
            self._follow(process, read_fd, started)
        except BaseException:
            _kill(process)
            raise
        finally:
            os.close(read_fd)
            if process.poll() is None:
                _kill(process)
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
        from autobatch.process.worker import _OOM_SIGNATURES

        lines = [line.strip() for line in _tail(self.log_path).splitlines() if line.strip()]
        # TensorFlow's own words first ("OOM when allocating tensor with shape[...]"), then anything else.
        for signatures in (("OOM when allocating",), (*_OOM_SIGNATURES, "could not create a memory object")):
            for line in reversed(lines):
                if any(signature in line for signature in signatures):
                    line = line.split("] ", 1)[-1] if line.startswith(("W0000", "E0000", "I0000")) else line
                    return f"{line[:250]}; the training process {self.how_it_ended()}"
        return None

    def last_log_line(self) -> str:
        lines = [line.strip() for line in _tail(self.log_path).splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

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


def _tail(path: Path, limit: int = 20000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


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


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _require_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidParameterError(name, value, f"must be an integer >= {minimum}")


# -- the training process ---------------------------------------------------------------------------


def _child_main(setup_path: str) -> int:
    with open(setup_path) as handle:
        setup = json.load(handle)
    budget_bytes = setup.get("memory_budget_bytes")
    if budget_bytes and setup["device"] == "cpu":
        import resource

        # Before the framework is imported: the whole process counts, as in a trial.
        resource.setrlimit(resource.RLIMIT_DATA, (budget_bytes, budget_bytes))
    for entry in reversed(setup.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    channel = os.fdopen(setup["event_fd"], "w")

    def send(event: str, **fields) -> None:
        channel.write(json.dumps({"event": event, **fields}) + "\n")
        channel.flush()

    backend = training = None
    try:
        from autobatch.core.registry import get_backend
        from autobatch.tasks.workload import load_workload

        backend = get_backend(setup["backend"])  # imports the framework, under the cap
        session_class = getattr(sys.modules[type(backend).__module__], "TrainingSession", None)
        if session_class is None:
            raise TrainingError(f"backend={setup['backend']!r} has no TrainingSession: it cannot train outside a trial")
        if budget_bytes and setup["device"] != "cpu":
            backend.apply_memory_cap(budget_bytes, setup["device"])
        workload = load_workload(setup["task"])
        training = _Training(setup, backend, session_class, workload, send)
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
        send("failed", kind="oom" if oom else "error", message=message)
        return 3 if oom else 1


def _safe_is_oom(judge, error: BaseException) -> bool:
    """Whether the session (or, before there is one, the backend) calls ``error`` an OOM."""
    try:
        return judge is not None and bool(judge.is_oom(error))
    except Exception:
        return False


class _Training:
    """The training process's loop: windows in plan order, checkpoints, evaluation, the output."""

    def __init__(self, setup: dict, backend, session_class, workload, send):
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
        self.session = session_class(
            workload,
            self.config,
            device=setup["device"],
            seed=setup["seed"],
            mixed_precision=setup["mixed_precision"],
            controller=self.controller,
        )
        self.windows = plan_epochs(
            len(workload.y_train), self.config.effective_batch_size, setup["epochs"], setup["seed"], setup["max_samples"]
        )
        self.checkpoint_every = setup.get("checkpoint_every")
        self.checkpointing = bool(
            setup["adaptive"] and (getattr(self.session, "crash_prone_oom", False) or self.checkpoint_every)
        )
        self.checkpoint_path = Path(setup["workdir"]) / "checkpoint"
        self._last_micro = self.controller.micro_batch_size

    def run(self) -> None:
        memory = _MemoryMeter(self.setup["device"], self.session)
        epochs = {epoch for epoch, _ in self.windows}
        self.send("ready", steps=len(self.windows), steps_per_epoch=math.ceil(len(self.windows) / max(1, len(epochs))))
        first = self._resume(self.setup["resume"]) if self.setup.get("resume") else 0
        self._hook_events()
        last_checkpoint_at, checkpoint_cost = time.perf_counter(), None
        for index in range(first, len(self.windows)):
            epoch, indices = self.windows[index]
            started = time.perf_counter()
            loss = self.session.run_window(indices, epoch)
            seconds = time.perf_counter() - started
            micro = self._last_micro
            self.send(
                "window", step=index + 1, epoch=epoch, loss=float(loss), samples=len(indices), seconds=seconds,
                micro=micro, accumulation=math.ceil(len(indices) / micro),
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
            peak_memory_bytes=memory.peak_bytes(),
            baseline_memory_bytes=memory.baseline_bytes(),
        )

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
        for offset, micro in enumerate(resume["replay"]):  # the same windows, at the sizes they ran at
            epoch, indices = self.windows[done + offset]
            controller.micro_batch_size = micro
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
                return batch, float(self.session.evaluate(self.workload.x_val, self.workload.y_val, batch))
            except UnrecoverableOOMError as error:
                raise TrainingOOMError(_eval_oom_message(batch, error.detail, adaptive=False)) from error
            except BaseException as error:
                if not _safe_is_oom(self.session, error):
                    raise
                detail = first_line(error)
                if not self.setup["adaptive"] or batch == 1:
                    raise TrainingOOMError(_eval_oom_message(batch, detail, self.setup["adaptive"])) from error
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


def _eval_oom_message(batch: int, detail: str, adaptive: bool) -> str:
    advice = "raise the memory budget" if adaptive and batch == 1 else f"give a smaller --eval-batch-size (e.g. {max(1, batch // 2)})"
    return f"out of memory in evaluation, after training, at a batch of {batch} samples ({detail}); {advice}"


class _MemoryMeter:
    """The training process's peak: the device allocator's on a GPU; on the CPU, as a trial measures it.

    RLIMIT_DATA counts the data segment, which has no peak; the peak is read as the data
    segment at the start plus how far resident memory rose (see ``autobatch.process.trial_child``).
    """

    def __init__(self, device: str, session):
        from autobatch.process.trial_child import _memory_status

        self.device = device
        self.session = session
        status = _memory_status()
        self.start_data = status.get("VmData")
        self.start_resident = status.get("VmRSS")
        self.start_device = None if device == "cpu" else session.current_memory_bytes()
        if device == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                pass

    def baseline_bytes(self) -> int | None:
        """In use once the model was built, before training: the data segment, or the device allocator's."""
        return self.start_device if self.device != "cpu" else self.start_data

    def peak_bytes(self) -> int | None:
        from autobatch.process.trial_child import _memory_status

        if self.device != "cpu":
            return self.session.peak_memory_bytes()
        peak = _memory_status().get("VmHWM")
        if peak is None or self.start_data is None or self.start_resident is None:
            return None
        return self.start_data + max(0, peak - self.start_resident)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
