"""Local workers: ``autobatch tune --workers N`` on one machine, one GPU each.

:func:`run_local_workers` starts each worker as ``python -m autobatch.search.worker_process
SPEC.json``; the spec is a JSON file of ``tune()`` keyword arguments (:func:`worker_spec`
writes it from the study's settings, :func:`tune_kwargs` reads it back). Also here: the
checks of the worker options, the default budget when workers share a device, and which
GPU each worker gets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autobatch._validation import Interval, validate_params
from autobatch.core.config import TrialBudget
from autobatch.errors import AutobatchError, InvalidParameterError
from autobatch.process.child import last_line, log_tail
from autobatch.search.space import SearchSpace

#: the module a local worker process runs (``python -m``)
WORKER_MODULE = "autobatch.search.worker_process"
#: the constraints of the distributed options of :func:`autobatch.tune`
WORKER_OPTION_CONSTRAINTS: dict[str, Any] = {
    "n_workers": Interval(int, 1, None),
    "study_trials": [Interval(int, 1, None), None],
    "heartbeat_interval": [Interval(int, 1, None), None],
    "grace_period": [Interval(int, 1, None), None],
}

_POLL_SECONDS = 0.5


def run_local_workers(
    study,
    n_workers: int,
    spec: dict,
    *,
    spread_gpus: bool,
    on_trial: Callable[[Any], None] | None = None,
    describe: Callable[[Any], Any] | None = None,
) -> None:
    """Run ``n_workers`` worker processes on ``study`` until they finish; report their trials.

    Each worker runs ``tune(**tune_kwargs(spec))`` in its own process (and session: the
    parent forwards one Ctrl-C to each), with its own sampler seed and, with
    ``spread_gpus``, its own GPU. A worker that fails stops the others.
    """
    from optuna.trial import TrialState

    from autobatch.core.devices import cuda_device_count

    gpus = (
        gpu_assignments(n_workers, os.environ.get("CUDA_VISIBLE_DEVICES"), cuda_device_count())
        if spread_gpus
        else [None] * n_workers
    )
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    seen = {t.number for t in study.get_trials(deepcopy=False, states=finished)}
    with tempfile.TemporaryDirectory(prefix="autobatch-workers-") as folder:
        processes = []
        for index, gpu in enumerate(gpus):
            base_seed = spec.get("seed")
            own_spec = {
                **spec,
                "seed": None if base_seed is None else base_seed + index,
                "sys_path": [entry for entry in sys.path if entry],
            }
            spec_path = Path(folder) / f"worker-{index}.json"
            spec_path.write_text(json.dumps(own_spec))
            env = dict(os.environ)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            log = open(Path(folder) / f"worker-{index}.log", "wb")
            processes.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", WORKER_MODULE, str(spec_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    ),
                    log,
                )
            )

        def report_new_trials() -> None:
            for trial in study.get_trials(deepcopy=False, states=finished):
                if trial.number not in seen:
                    seen.add(trial.number)
                    if on_trial is not None and describe is not None:
                        record = describe(trial)
                        if record is not None:
                            on_trial(record)

        failure = None
        try:
            while any(process.poll() is None for process, _ in processes):
                report_new_trials()
                for index, (process, log) in enumerate(processes):
                    if failure is None and process.returncode not in (None, 0):
                        failure = (index, process.returncode, last_line(log_tail(log.name)))
                        _stop(processes)
                time.sleep(_POLL_SECONDS)
            report_new_trials()
        except KeyboardInterrupt:
            _stop(processes)
            raise
        finally:
            for _, log in processes:
                log.close()
        for index, (process, log) in enumerate(processes):
            if failure is None and process.returncode != 0:
                failure = (index, process.returncode, last_line(log_tail(log.name)))
        if failure is not None:
            index, code, line = failure
            if code == 130:
                raise KeyboardInterrupt
            raise AutobatchError(f"worker {index} stopped (exit code {code}): {line or 'no output'}")


def worker_spec(settings: dict, **options: Any) -> dict:
    """A local worker's ``tune()`` keyword arguments, as JSON: the study's settings (as
    :func:`autobatch.tune` stores them) and the ``options`` of this call that the study does not store."""
    return {
        "task": settings["task"],
        "backend": settings["backend"],
        "device": settings["device"],
        "memory_budget": settings["memory_budget_bytes"],
        "search_space": settings["search_space"],
        "trial_budget": settings["trial_budget"],
        "loss_tolerance": settings["loss_tolerance"],
        "safety_margin": settings["safety_margin"],
        "objective": settings["objective"],
        "pruner": settings["pruner"],
        **options,
    }


def tune_kwargs(spec: dict) -> dict:
    """The ``tune()`` keyword arguments a :func:`worker_spec` stands for (its objects rebuilt from JSON)."""
    return {
        **spec,
        "search_space": SearchSpace.from_dict(spec["search_space"]),
        "trial_budget": TrialBudget.from_dict(spec["trial_budget"]),
    }


@validate_params(WORKER_OPTION_CONSTRAINTS)
def check_worker_options(
    n_workers: int, study_trials: int | None, heartbeat_interval: int | None, grace_period: int | None
) -> None:
    """Validate the distributed options of :func:`autobatch.tune` (before any storage is touched)."""
    if heartbeat_interval is not None and grace_period is not None and grace_period <= heartbeat_interval:
        raise InvalidParameterError(
            "grace_period", grace_period, f"must be longer than heartbeat_interval ({heartbeat_interval} s)"
        )


def check_workers_fit(n_workers: int, device: str, budget_bytes: int) -> None:
    """Local workers sharing a device must fit on it together."""
    if n_workers <= 1:
        return
    sharing = workers_per_device(n_workers, device)
    if sharing <= 1:
        return
    from autobatch.core.memory import device_memory_bytes, format_bytes

    total = device_memory_bytes(device)
    if sharing * budget_bytes > total:
        raise InvalidParameterError(
            "memory_budget",
            format_bytes(budget_bytes),
            f"{sharing} workers share {device}, and {sharing} x the budget exceeds its "
            f"{format_bytes(total)}; lower the budget or the number of workers",
        )


def default_budget(n_workers: int, device: str) -> str:
    """90% of the device, shared by the local workers that run on it at once."""
    return f"{90 / workers_per_device(n_workers, device):g}%"


def workers_per_device(n_workers: int, device: str) -> int:
    """How many of ``n_workers`` local workers share one device."""
    if not device.startswith("cuda"):
        return n_workers
    from autobatch.core.devices import cuda_device_count

    gpus = set(gpu_assignments(n_workers, os.environ.get("CUDA_VISIBLE_DEVICES"), cuda_device_count())) - {None}
    return math.ceil(n_workers / len(gpus)) if gpus else n_workers


def gpu_assignments(n_workers: int, visible: str | None, device_count: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``n_workers`` workers: the GPUs in turn.

    ``visible`` is the parent's own ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), honoured when
    set; otherwise GPUs ``0 .. device_count-1``. With no GPU, every worker gets None.
    """
    if visible is not None:
        gpus = [part.strip() for part in visible.split(",") if part.strip()]
    else:
        gpus = [str(index) for index in range(device_count)]
    if not gpus:
        return [None] * n_workers
    return [gpus[index % len(gpus)] for index in range(n_workers)]


def _stop(processes, wait: float = 60.0) -> None:
    """Ctrl-C each running worker (it fails and re-queues its trial), then wait for it."""
    for process, _ in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + wait
    for process, _ in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
