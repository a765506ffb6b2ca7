"""The PyTorch backend behind the common trial interface: device, memory cap, OOM classification,
peak memory, and what a trial does in PyTorch (build, window step, evaluation).

The trial itself runs through the framework-neutral template in :mod:`autobatch.backends._trial`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (~1 s); forked trials inherit it

from autobatch.backends._trial import Trial, TrialBackend
from autobatch.backends.torch import memory
from autobatch.backends.torch.accumulate import GradientNoiseMeter, evaluate, train_window
from autobatch.backends.torch.data import ArrayDataset, MicroBatches, device_batches
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.session import TorchTrainingSession
from autobatch.backends.torch.training import make_loss, make_optimizer
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.windows import Window
from autobatch.tasks.workload import Workload

__all__ = ["TorchBackend"]


class TorchBackend(TrialBackend):
    name = "torch"
    session_class = TorchTrainingSession

    def default_device(self) -> str:
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def fork_safe(self, device: str) -> bool:
        # Importing torch starts no thread pool and does not initialise CUDA, so a forked
        # process starts clean; the cap is applied in each of them.
        return True

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        if not device.startswith("cuda"):
            return
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), index)

    def is_oom(self, error: BaseException) -> bool:
        return memory.is_oom(error)

    def peak_memory_bytes(self, device: str) -> int | None:
        return memory.peak_memory_bytes(device)

    def current_memory_bytes(self, device: str) -> int | None:
        return memory.current_memory_bytes(device)

    def reset_peak_memory(self, device: str) -> None:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

    def start_trial(self, workload: Workload, config: TrialConfig, budget: TrialBudget, device: str) -> TorchTrial:
        return TorchTrial(workload, config, budget, torch.device(device))


class TorchTrial(Trial):
    """A trial's model, optimizer, loss, precision and data in PyTorch, built once."""

    def __init__(self, workload: Workload, config: TrialConfig, budget: TrialBudget, device: torch.device):
        super().__init__(config, budget)
        self.device = device
        self.on_cuda = device.type == "cuda"
        torch.manual_seed(budget.seed)
        self.model = workload.build_model("torch").to(device)
        self.model.train()
        self.optimizer = make_optimizer(workload.optimizer, self.model.parameters(), config.learning_rate)
        self.loss_fn = make_loss(workload.loss)
        self.precision = MixedPrecision(device, enabled=budget.mixed_precision)
        self.train_set = ArrayDataset(workload.x_train, workload.y_train)
        self.meter = GradientNoiseMeter(self.model.parameters()) if self.measures_noise else None

    def wait_for_device(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def feed(self, chunks: Iterator[list[Window]]) -> Iterator[tuple[Window, MicroBatches]]:
        return device_batches(self.train_set, chunks, self.budget, self.device)

    def train_window(self, window: Window, micro_batches: MicroBatches, measure: bool) -> float:
        meter = self.meter if measure else None
        loss = train_window(
            self.model, self.optimizer, self.loss_fn, micro_batches, precision=self.precision, noise_meter=meter
        )
        self.wait_for_device()
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int, limit: int | None) -> float:
        return evaluate(self.model, self.loss_fn, x, y, batch_size, self.device, self.precision, limit)

    def finish(self) -> None:
        if self.meter is None:
            return
        self.meter.close()
        for micro_sq_norm, window_sq_norm in self.meter.window_norms():
            self.noise.add_window(
                self.config.micro_batch_size, self.config.effective_batch_size, micro_sq_norm, window_sq_norm
            )
