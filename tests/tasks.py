"""Workloads that misbehave on purpose, for the worker's failure tests."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from autobatch.tasks.workload import Workload


def _tiny(models) -> Workload:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=64).astype(np.int64)
    return Workload(name="tiny", x_train=x, y_train=y, x_val=x[:16], y_val=y[:16], models=models)


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _raise():
    raise RuntimeError("the user's model builder failed on purpose")


def _sleep():
    time.sleep(60)


def killed() -> Workload:
    return _tiny({"torch": _kill_self, "tensorflow": _kill_self})


def raises() -> Workload:
    return _tiny({"torch": _raise, "tensorflow": _raise})


def sleeps() -> Workload:
    return _tiny({"torch": _sleep, "tensorflow": _sleep})


def factory_raises() -> Workload:
    raise ValueError("no data here")


def _dies_above_eight():
    import torch

    class DiesAboveEight(torch.nn.Module):
        """A linear model whose process dies (SIGKILL, as the kernel's OOM killer ends one) on a batch above 8."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.shape[0] > 8:
                _kill_self()
            return self.linear(x)

    return DiesAboveEight()


def dies_above_eight() -> Workload:
    return _tiny({"torch": _dies_above_eight})
