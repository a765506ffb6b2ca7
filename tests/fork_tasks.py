"""PyTorch tasks whose loaders touch CUDA before the trial child forks, for test_fork_safety and test_gpu."""

from __future__ import annotations

import os

import numpy as np
import torch

from autobatch.backends.torch.backend import TorchBackend
from autobatch.tasks.workload import Workload


def _tiny() -> Workload:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=64).astype(np.int64)
    return Workload(name="tiny", x_train=x, y_train=y, x_val=x[:16], y_val=y[:16], models={"torch": _linear})


def _linear():
    return torch.nn.Linear(4, 2)


def asks_for_cuda() -> Workload:
    """A loader that calls torch.cuda.is_available(), as many do."""
    torch.cuda.is_available()
    return _tiny()


def initialises_cuda() -> Workload:
    """A loader that leaves CUDA initialised (``torch.cuda.init()``).

    Without a GPU there is no CUDA to initialise: the state such a loader leaves is simulated.
    """
    if torch.cuda.is_available():
        torch.cuda.init()
    else:
        torch.cuda.is_initialized = lambda: True
    return _tiny()


class ReportingTorchBackend(TorchBackend):
    """The PyTorch backend, reporting how the trial process was started."""

    def run_trial(self, workload, config, budget, device, progress):
        measured = super().run_trial(workload, config, budget, device, progress)
        measured.extras["nvml_based_cuda_check"] = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        return measured
