"""A backend and a task for tests/test_study_paths.py: a trial that overstays, and a memory cliff.

``SleepyBackend``: the synthetic backend, except that a search trial at micro-batch
``SLEEPY_CONFIG[0]`` × accumulation ``SLEEPY_CONFIG[1]`` sleeps for a minute, so that
``trial_timeout`` has a trial to stop. Probes run at accumulation 1 and stay fast.

``cliff``: a real PyTorch task whose memory is flat up to ``CLIFF`` samples per micro-batch
and past the budget above it (a kernel that switches to a workspace-hungry algorithm at a
size, as cuDNN's can): the probe finds the wall at ``CLIFF`` or just below, and the memory
model fitted on the probes, flat, predicts that larger micro-batches fit. A search trial
past the wall is therefore run, and runs out of memory for real under the budget
(``DefaultCPUAllocator: can't allocate memory``).
"""

from __future__ import annotations

import time

import numpy as np

from autobatch.tasks.workload import Workload
from tests.synthetic_backend import SyntheticBackend

SLEEPY_CONFIG = (16, 4)
SLEEP_SECONDS = 60.0

CLIFF = 48
#: what a micro-batch past the cliff asks for: more than any budget these tests set
WORKSPACE_BYTES = 2**34


class SleepyBackend(SyntheticBackend):
    name = "synthetic-sleepy"

    def run_trial(self, workload, config, budget, device, progress):
        if (config.micro_batch_size, config.accumulation_steps) == SLEEPY_CONFIG:
            time.sleep(SLEEP_SECONDS)
        return super().run_trial(workload, config, budget, device, progress)


def cliff() -> Workload:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return Workload(
        name="cliff",
        x_train=x[:256],
        y_train=y[:256],
        x_val=x[256:],
        y_val=y[256:],
        models={"torch": "tests.study_path_tasks:cliff_model"},
        optimizer="sgd",
        base_batch_size=16,
        base_learning_rate=0.05,
    )


def cliff_model():
    import torch

    class Cliff(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 2)

        def forward(self, x):
            if self.training and len(x) > CLIFF:
                workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8)
                x = x + workspace[0] * 0
            return self.linear(x)

    return Cliff()
