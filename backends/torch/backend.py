"""The PyTorch backend behind the common trial interface: device, memory cap, OOM classification,
peak memory, and what a trial does in PyTorch (build, window step, evaluation).

The trial itself runs through the framework-neutral template in :mod:`autobatch.backends._trial`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (~1 s); forked trials inherit it

from autobatch.backends._trial import Trial, TrialBackend
from autobatch.backends.torch import memory
from autobatch.backends.torch.accumulate import GradientNoiseMeter, LearningRateScaler, evaluate, train_window
from autobatch.backends.torch.data import MicroBatches, device_batches
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.session import TorchTrainingSession
from autobatch.backends.torch.task import build, evaluation_order, training_sizes
from autobatch.backends.torch.training import require_batch_norm_micro_batch
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.devices import DeviceMemoryMeter
from autobatch.core.memory import allocator_cap_bytes
from autobatch.core.noise import MeasuringBudget
from autobatch.core.windows import Window
from autobatch.tasks.loading import Task

__all__ = ["TorchBackend"]


class TorchBackend(TrialBackend):
    name = "torch"
    session_class = TorchTrainingSession

    def __init__(self) -> None:
        self._device_memory: DeviceMemoryMeter | None = None

    def default_device(self) -> str:
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def fork_safe(self, device: str) -> bool:
        # Importing torch starts no thread pool and does not initialise CUDA, so a forked
        # process starts clean; the cap is applied in each of them. A task whose loading
        # initialised CUDA has spoilt that: a forked process could not use CUDA again ("Cannot
        # re-initialize CUDA in forked subprocess"). (Trial children run with
        # PYTORCH_NVML_BASED_CUDA_CHECK=1, so torch.cuda.is_available() alone does not.)
        return not torch.cuda.is_initialized()

    @contextlib.contextmanager
    def task_loading(self) -> Iterator[None]:
        """Load the task on one intra-op thread, so that no OpenMP thread team exists when trials fork.

        A task's factory often runs tensor ops (making or labelling its data); run on several
        threads, they start OpenMP's team, whose threads a forked process does not inherit: its
        first parallel op then waits for them forever (measured: a 5000×784 ``argmax`` in the
        factory, and every forked trial hung in its first ``Linear``). One thread starts no team;
        the count is put back before the fork, and each trial starts its own.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def configure_device(self, device: str, budget_bytes: int | None) -> None:
        if _is_cuda(device):
            self._device_memory = self._new_meter(device)  # before CUDA starts: NVML alone

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        """Cap the caching allocator at the budget less what this process holds outside it.

        ``set_per_process_memory_fraction`` caps the caching allocator alone (a fraction of
        the total ``cudaMemGetInfo`` reports); the CUDA context created here is measured and
        taken off first.
        """
        if not _is_cuda(device):
            return
        if self._device_memory is None:
            self._device_memory = self._new_meter(device)
        index = _cuda_index(device)
        _, total = torch.cuda.mem_get_info(index)  # starts this process's CUDA context, measured next
        cap = allocator_cap_bytes(budget_bytes, self.device_overhead_bytes(device), device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)

    def is_oom(self, error: BaseException) -> bool:
        return memory.is_oom(error)

    def peak_memory_bytes(self, device: str) -> int | None:
        return memory.peak_memory_bytes(device)

    def current_memory_bytes(self, device: str) -> int | None:
        return memory.current_memory_bytes(device)

    def device_overhead_bytes(self, device: str) -> int | None:
        if not _is_cuda(device) or self._device_memory is None or not torch.cuda.is_initialized():
            return None
        return self._device_memory.outside_bytes(torch.cuda.memory_reserved(_cuda_index(device)))

    def reset_peak_memory(self, device: str) -> None:
        if _is_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)

    def start_trial(self, task: Task, config: TrialConfig, budget: TrialBudget, device: str) -> TorchTrial:
        return TorchTrial(task, config, budget, torch.device(device))

    @staticmethod
    def _new_meter(device: str) -> DeviceMemoryMeter:
        """What this process holds on ``device``; its reading from before CUDA started only if CUDA has not yet."""
        meter = DeviceMemoryMeter(device)
        if torch.cuda.is_initialized():
            meter.used_before_bytes = None  # the device's memory now includes this process's own
        return meter


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _cuda_index(device: str) -> int:
    return torch.device(device).index or 0


class TorchTrial(Trial):
    """A trial's model, optimizer, loss, precision and data in PyTorch, built once from a
    :class:`~autobatch.TorchTask` (or a ``Workload``, turned into one)."""

    def __init__(self, task: Task, config: TrialConfig, budget: TrialBudget, device: torch.device):
        super().__init__(config, budget)
        self.device = device
        self.on_cuda = device.type == "cuda"
        torch.manual_seed(budget.seed)
        parts = build(task, config.learning_rate, device)
        if parts.has_batch_norm:
            require_batch_norm_micro_batch(config.micro_batch_size)
        self.parts = parts
        self.task = parts.task
        self.model = parts.model
        self.optimizer = parts.optimizer
        self.loss = parts.loss
        self.precision = MixedPrecision(device, enabled=budget.mixed_precision)
        self.n_train = len(parts.train_set)
        self.sample_sizes = training_sizes(parts)
        self.optimizer_name = parts.optimizer_name
        self.meter = GradientNoiseMeter(self.model.parameters()) if self.measures_noise else None
        self.measuring = MeasuringBudget()
        self.learning_rate = LearningRateScaler(self.optimizer)
        self._val_orders: dict[int, np.ndarray] = {}

    def wait_for_device(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def feed(self, chunks: Iterator[list[Window]]) -> Iterator[tuple[Window, MicroBatches]]:
        return device_batches(self.parts.train_set, self.parts.train_collate, chunks, self.budget, self.device)

    def train_window(self, window: Window, micro_batches: MicroBatches, measure: bool) -> float:
        if self.meter is None:
            return self._train_window(micro_batches, None)
        # The noise estimate measures the windows its budget allows (see MeasuringBudget).
        meter = self.meter if measure and self.measuring.due() else None
        started, measured_before = time.perf_counter(), self.meter.seconds
        loss = self._train_window(micro_batches, meter)
        measured = self.meter.seconds - measured_before if meter is not None else None
        self.measuring.window_done(time.perf_counter() - started, measured)
        return loss

    def _train_window(self, micro_batches: MicroBatches, meter: GradientNoiseMeter | None) -> float:
        loss = train_window(
            self.model,
            self.optimizer,
            self.loss,
            micro_batches,
            precision=self.precision,
            noise_meter=meter,
            min_micro_batch=self.parts.min_micro_batch,
        )
        self.wait_for_device()
        return loss

    def scale_learning_rate(self, multiplier: float) -> None:
        self.learning_rate.scale(multiplier)

    def evaluate(self, batch_size: int, limit: int | None) -> float:
        val_set = self.parts.val_set
        count = len(val_set) if limit is None else min(limit, len(val_set))
        if count not in self._val_orders:  # sizes are read once per trial, not at every evaluation
            self._val_orders[count] = evaluation_order(val_set, count, self.task.sample_size)
        return evaluate(
            self.model,
            self.loss,
            val_set,
            batch_size,
            self.device,
            collate_fn=self.parts.val_collate,
            precision=self.precision,
            indices=self._val_orders[count],
        )

    def extras(self) -> dict[str, Any]:
        extras = super().extras()
        if self.parts.has_batch_norm:  # the search leaves micro-batch 1 out of its space
            extras["min_micro_batch"] = self.parts.min_micro_batch
        return extras

    def finish(self) -> None:
        if self.meter is None:
            return
        self.meter.close()
        for micro_sq_norm, window_sq_norm in self.meter.window_norms():
            self.noise.add_window(
                self.config.micro_batch_size, self.config.effective_batch_size, micro_sq_norm, window_sq_norm
            )
