"""A backend whose throughput, memory and loss are known functions of the config.

Memory is real: a trial holds ``BASE + PER_SAMPLE × micro_batch`` bytes of touched
numpy memory, so the worker's RLIMIT_DATA budget stops a config that is too large
exactly as it stops a real model. Throughput and loss are closed-form, so a test
can compute the true optimum.
"""

from __future__ import annotations

import math

import numpy as np

from autobatch.backends.base import Backend, TrialMeasurements
from autobatch.tasks.workload import Workload

MIB = 2**20
BASE_BYTES = 40 * MIB
PER_SAMPLE_BYTES = 1 * MIB
BEST_LR_AT_32 = 1e-3


def throughput(micro: int, accumulation: int) -> float:
    """Bigger micro-batches use the device better; accumulation costs a little per window."""
    return 5000.0 * micro / (micro + 48) * (1.0 - 0.04 * (accumulation - 1) / accumulation)


def loss(effective: int, learning_rate: float) -> float:
    """Best at the square-root rule's LR; large effective batches generalise worse."""
    best_lr = BEST_LR_AT_32 * math.sqrt(effective / 32)
    return 0.5 + 0.04 * math.log10(learning_rate / best_lr) ** 2 + 0.03 * (effective / 128) ** 2


class SyntheticBackend(Backend):
    name = "synthetic"

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        pass

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)

    def run_trial(self, workload, config, budget, device, progress) -> TrialMeasurements:
        progress.mark_baseline()
        progress.phase = "train"
        held = np.ones(BASE_BYTES + PER_SAMPLE_BYTES * config.micro_batch_size, dtype=np.uint8)
        del held
        progress.phase = "eval"
        return TrialMeasurements(
            samples_per_second=throughput(config.micro_batch_size, config.accumulation_steps),
            val_loss=loss(config.effective_batch_size, config.learning_rate),
            samples_trained=budget.train_samples,
            steps_timed=1,
        )


def workload() -> Workload:
    x = np.zeros((4096, 2), dtype=np.float32)  # more samples than any micro-batch that fits
    y = np.zeros(4096, dtype=np.int64)
    return Workload(
        name="synthetic",
        x_train=x,
        y_train=y,
        x_val=x,
        y_val=y,
        models={"synthetic": lambda: None},
        base_batch_size=32,
        base_learning_rate=BEST_LR_AT_32,
    )
