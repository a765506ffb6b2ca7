"""Train a task with a study's recommended config (or a given one), optionally adapting the micro-batch.

:func:`train` is ``autobatch train`` in Python. The training runs in a child process
(:mod:`autobatch.training.child`, in a new interpreter that
:mod:`autobatch.training.supervisor` starts, follows and restarts), as a trial does, for
three reasons:

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

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from autobatch._validation import Interval, validate_params
from autobatch.core.adaptive import DEFAULT_GROW_AFTER
from autobatch.core.config import TrialConfig
from autobatch.core.memory import MemoryBudget
from autobatch.errors import InvalidParameterError, StorageError
from autobatch.process.child import budget_as_given, child_setup
from autobatch.training.result import TrainingError, TrainingOOMError, TrainResult
from autobatch.training.supervisor import DEFAULT_MAX_RESTARTS, Supervisor

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "TENSORFLOW_OUTPUTS",
    "TrainResult",
    "TrainingError",
    "TrainingOOMError",
    "plan_epochs",
    "train",
]

#: model formats ``output`` may name, per framework (PyTorch: anything else is a ``torch.save`` state_dict)
TENSORFLOW_OUTPUTS = (".keras", ".weights.h5", ".npz")

_COUNT = Interval(int, 1, None)


@validate_params(
    {
        "epochs": _COUNT,
        "max_samples": [_COUNT, None],
        "max_micro_batch": [_COUNT, None],
        "grow_after": [_COUNT, None],
        "seed": Interval(int, 0, None),
        "eval_batch_size": [_COUNT, None],
        "max_restarts": Interval(int, 0, None),
        "checkpoint_every": [_COUNT, None],
    }
)
def train(
    task: Any,
    backend: str | None = None,
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
    memory_budget: str | int | MemoryBudget | None = None,
    device: str | None = None,
    seed: int = 0,
    eval_batch_size: int | None = None,
    mixed_precision: bool = False,
    output: str | os.PathLike | None = None,
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
    process, at most ``max_restarts`` times. A ``memory_budget`` under which the framework
    cannot even import and the task load is refused with :class:`InvalidParameterError`.
    """
    setup = _prepare(
        task=task,
        backend=backend,
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        learning_rate=learning_rate,
        study_name=study_name,
        storage=storage,
        epochs=epochs,
        max_samples=max_samples,
        adaptive=adaptive,
        max_micro_batch=max_micro_batch,
        grow_after=grow_after,
        memory_budget=memory_budget,
        device=device,
        seed=seed,
        eval_batch_size=eval_batch_size,
        mixed_precision=mixed_precision,
        output=output,
    )
    setup["checkpoint_every"] = checkpoint_every
    return Supervisor(setup, on_event=on_event, verbose=verbose, max_restarts=max_restarts).run()


def plan_epochs(
    n_train: int, effective_batch_size: int, epochs: int, seed: int, max_samples: int | None = None
) -> list[tuple[int, np.ndarray]]:
    """``(epoch, sample indices)`` of every window: one seeded permutation per epoch, cut into effective batches.

    The plan does not depend on the micro-batch, so a run that adapts and one that
    does not train on the same samples in the same order.
    """
    from autobatch.core.windows import SampleStream

    stream = SampleStream(n_train, seed=seed)
    remaining = max_samples if max_samples is not None else epochs * n_train
    windows: list[tuple[int, np.ndarray]] = []
    for epoch in range(1, epochs + 1):
        order = stream.take(n_train)
        for start in range(0, n_train, effective_batch_size):
            if remaining <= 0:
                return windows
            indices = order[start : start + min(effective_batch_size, remaining)]
            windows.append((epoch, indices))
            remaining -= len(indices)
    return windows


# -- the calling side: options checked, the config resolved, the child's setup -------------------


def _prepare(**options) -> dict:
    """The child's setup: the config resolved, and what only the task, the study and the files can tell checked."""
    from autobatch.core.registry import backend_path
    from autobatch.tasks.loading import load_task, task_framework, task_path

    task = task_path(options["task"])  # a factory given as an object reaches the child by its import path
    workload = load_task(task)  # a task that does not load fails here, as bad input
    backend = options["backend"]
    if backend is not None:
        backend_path(backend)  # an unknown backend fails here

    study_name = options["study_name"]
    memory_budget, device, mixed_precision = options["memory_budget"], options["device"], options["mixed_precision"]
    wall = None
    if study_name is not None:
        given = [
            name for name in ("micro_batch_size", "accumulation_steps", "learning_rate") if options[name] is not None
        ]
        if given:
            raise InvalidParameterError(
                "study_name", study_name, f"give a study or a config ({', '.join(given)}), not both"
            )
        recommended, settings, wall = _study_config(study_name, options["storage"], task, backend)
        backend = backend or settings.get("backend")  # the study's own framework
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
    backend = task_framework(workload, backend)  # after the study's check: its mismatch says more
    max_micro = options["max_micro_batch"]
    if max_micro is None:
        max_micro = max(config.micro_batch_size, wall or 0)
    elif max_micro < config.micro_batch_size:
        raise InvalidParameterError(
            "max_micro_batch", max_micro, f"must be >= the micro-batch size {config.micro_batch_size}"
        )
    if device is None:
        from autobatch.core.devices import default_device

        device = default_device()
    budget = MemoryBudget.parse(memory_budget) if memory_budget is not None else None
    output = _check_output(options["output"], backend)
    return {
        **child_setup(device, budget.resolve(device) if budget is not None else None),
        "memory_budget": budget_as_given(memory_budget),  # for messages
        "task": task,
        "backend": backend,
        "config": config.to_dict(),
        "epochs": options["epochs"],
        "max_samples": options["max_samples"],
        "n_train": workload.n_train,
        "adaptive": bool(options["adaptive"]),
        "max_micro_batch": max_micro,
        "grow_after": options["grow_after"],
        "seed": options["seed"],
        "eval_batch_size": options["eval_batch_size"],
        "mixed_precision": bool(mixed_precision),
        "output": output,
        "study_name": study_name,
    }


def _study_config(study_name: str, storage: str | None, task: str, backend: str | None) -> tuple[dict, dict, int]:
    from autobatch.search.results import load_study_result
    from autobatch.search.storage import DEFAULT_STORAGE

    result = load_study_result(storage or DEFAULT_STORAGE, study_name)
    settings = result.study.user_attrs.get("autobatch", {})
    for key, value in (("task", task), ("backend", backend)):
        if value is not None and settings.get(key) not in (None, value):
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
        raise InvalidParameterError(
            "output", str(output), f"a Keras model is written as {', '.join(TENSORFLOW_OUTPUTS)}"
        )
    return str(path)
