"""Tasks, a backend and helpers for the reliability and distributed tests.

``nan_loss``: a real PyTorch task whose validation loss is NaN (NaN in its inputs, as a
corrupt data set has). The right outcome, documented in ``autobatch.tune``: the probe
runs the task at its own base learning rate, sees a NaN loss in every probe, and stops
with an error before any trial is recorded, since no configuration could be ranked.

``SlowSyntheticBackend``: the synthetic backend, with search trials that take
``SEARCH_TRIAL_SECONDS``, so a test can kill or interrupt a worker in the middle of one.
Probes (which run at the task's base learning rate) stay fast.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from autobatch.tasks.workload import Workload
from tests.synthetic_backend import BEST_LR_AT_32, SyntheticBackend

SEARCH_TRIAL_SECONDS = 2.0


class SlowSyntheticBackend(SyntheticBackend):
    name = "synthetic-slow"
    search_trial_seconds = SEARCH_TRIAL_SECONDS

    def run_trial(self, workload, config, budget, device, progress):
        if config.learning_rate != BEST_LR_AT_32:  # a search trial, not a probe
            time.sleep(self.search_trial_seconds)
        return super().run_trial(workload, config, budget, device, progress)


class SlowerSyntheticBackend(SlowSyntheticBackend):
    """Search trials long enough that a test which sees two of them running (from two workers that
    started them at different moments) can interrupt both before either ends, on a loaded machine too."""

    name = "synthetic-slower"
    search_trial_seconds = 8.0


class HangingSyntheticBackend(SyntheticBackend):
    """Search trials that never end, as a deadlock in a user's code would: only a kill stops them."""

    name = "synthetic-hanging"

    def run_trial(self, workload, config, budget, device, progress):
        if config.learning_rate != BEST_LR_AT_32:  # a search trial, not a probe
            time.sleep(3600)
        return super().run_trial(workload, config, budget, device, progress)


def _linear_model():
    import torch

    return torch.nn.Linear(4, 2)


def nan_loss() -> Workload:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    x[::7, 1] = np.nan  # a corrupt feature: every forward pass that sees it gives NaN
    y = rng.integers(0, 2, size=64).astype(np.int64)
    return Workload(
        name="nan-loss",
        x_train=x,
        y_train=y,
        x_val=x[:16],
        y_val=y[:16],
        models={"torch": _linear_model},
        base_batch_size=32,
        base_learning_rate=1e-3,
    )


# Helpers shared by tests/test_distributed.py and tests/test_reliability.py.

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = [
    "tests.synthetic_backend:workload",
    "--backend",
    "tests.synthetic_backend:SyntheticBackend",
    "--memory-budget",
    "256MiB",
    "--device",
    "cpu",
]
SLOW = [
    "tests.synthetic_backend:workload",
    "--backend",
    "tests.reliability_tasks:SlowSyntheticBackend",
    "--memory-budget",
    "256MiB",
    "--device",
    "cpu",
]
SLOWER = [arg.replace("SlowSyntheticBackend", "SlowerSyntheticBackend") for arg in SLOW]
FAST_HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "3"]


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """``autobatch ARGS`` as a user starts it, without waiting for it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "autobatch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


@functools.cache
def _storage(url: str):
    from autobatch.search.storage import open_storage

    return open_storage(url)


def study_trials(url: str, study_name: str) -> list:
    """Every trial of ``study_name`` as the storage holds it now ([] if there is no such study)."""
    storage = _storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def study_user_attrs(url: str, study_name: str) -> dict:
    storage = _storage(url)
    return storage.get_study_user_attrs(storage.get_study_id_from_name(study_name))


def study_names(url: str) -> list[str]:
    return sorted(s.study_name for s in _storage(url).get_all_studies())


def trial_count(url: str) -> int:
    """Trials in every study of the storage."""
    storage = _storage(url)
    return sum(storage.get_n_trials(s._study_id) for s in storage.get_all_studies())


def by_state(trials) -> dict[str, list]:
    states: dict[str, list] = {}
    for trial in trials:
        states.setdefault(trial.state.name, []).append(trial)
    return states


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def error_lines(stderr: str, command: str) -> list[str]:
    """The ``autobatch COMMAND: ...`` lines, the progress bar's carriage returns taken apart."""
    lines = []
    for line in stderr.replace("\r", "\n").splitlines():
        at = line.find(f"autobatch {command}:")
        if at >= 0:
            lines.append(line[at:].strip())
    return lines


def is_slow_and_running(trial, settled: float = 0.3) -> bool:
    """Running for ``settled`` s, and a trial of SlowSyntheticBackend that sleeps: one whose
    learning rate is not the base one (effective batch 32 at the rule's rate runs at once)."""
    params = trial.params
    if trial.state.name != "RUNNING" or not trial.datetime_start or "lr_offset_decades" not in params:
        return False
    effective = params.get("micro_batch_size", 0) * params.get("accumulation_steps", 1)
    base = effective == 32 and params["lr_offset_decades"] == 0.0
    return not base and (datetime.datetime.now() - trial.datetime_start).total_seconds() >= settled


def running_trial_of(url: str, study_name: str, pid: int):
    """A slow trial that process ``pid`` is in the middle of (or None)."""
    label = f"{socket.gethostname()}:{pid}"
    for trial in study_trials(url, study_name):
        if trial.user_attrs.get("worker") == label and is_slow_and_running(trial):
            return trial
    return None
