"""What ``autobatch train`` needs from PyTorch: a model of the task trained window by window.

The loop over epochs, the progress and the checkpoints' timing live in :mod:`autobatch.training`,
framework-free; it reaches this session through ``TorchBackend.training_session``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from autobatch.backends.base import TrainingSession
from autobatch.backends.torch import memory
from autobatch.backends.torch.accumulate import LearningRateScaler, evaluate
from autobatch.backends.torch.adaptive import AdaptiveMicroBatcher
from autobatch.backends.torch.data import fetch, to_device
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.task import build, evaluation_order
from autobatch.core.adaptive import MicroBatchController
from autobatch.core.config import TrialConfig
from autobatch.tasks.loading import Task

__all__ = ["TorchTrainingSession"]


class TorchTrainingSession(TrainingSession):
    """A PyTorch model of ``task`` (a :class:`~autobatch.TorchTask` or a ``Workload``) trained window by
    window, at the micro-batch ``controller`` keeps."""

    def __init__(
        self,
        task: Task,
        config: TrialConfig,
        *,
        device: str,
        seed: int,
        mixed_precision: bool,
        controller: MicroBatchController,
    ):
        self.device = torch.device(device)
        #: on the CPU an OOM inside oneDNN leaves the process unable to train on: checkpoints let a
        #: new process take over (PyTorch raises its other OOMs, and the process survives them)
        self.crash_prone_oom = self.device.type == "cpu"
        self.on_cuda = self.device.type == "cuda"
        torch.manual_seed(seed)
        self.parts = build(task, config.learning_rate, self.device)
        self.task = self.parts.task
        self.model = self.parts.model
        self.optimizer = self.parts.optimizer
        self.precision = MixedPrecision(self.device, enabled=mixed_precision)
        self.batcher = AdaptiveMicroBatcher(
            self.model,
            self.optimizer,
            precision=self.precision,
            controller=controller,
            batch_loss=self.parts.loss,
        )
        self.n_train = len(self.parts.train_set)
        self.learning_rate = LearningRateScaler(self.optimizer)  # before a checkpoint's rates are loaded
        self._val_order: np.ndarray | None = None  # read once: an evaluation redone at a smaller batch reuses it

    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        loss = self.batcher.step_indices(indices, self._micro_batch, epoch=epoch)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return loss

    def scale_learning_rate(self, multiplier: float) -> None:
        self.learning_rate.scale(multiplier)

    def evaluate(self, batch_size: int) -> float:
        val_set = self.parts.val_set
        if self._val_order is None:
            self._val_order = evaluation_order(val_set, len(val_set), self.task.sample_size)
        try:
            return evaluate(
                self.model,
                self.parts.loss,
                val_set,
                batch_size,
                self.device,
                collate_fn=self.parts.val_collate,
                precision=self.precision,
                indices=self._val_order,
            )
        finally:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)

    def _micro_batch(self, indices: Sequence[int]) -> Any:
        """The samples at ``indices``, collated as one micro-batch, on the device."""
        return to_device(fetch(self.parts.train_set, indices, self.parts.train_collate), self.device)

    def release(self) -> None:
        """Free what a failed evaluation held."""
        memory.release_cached_memory()

    def save(self, path: str) -> None:
        """The trained weights: a ``state_dict`` (``torch.save``), or a numpy archive for ``.npz``."""
        state = self.model.state_dict()
        if str(path).endswith(".npz"):
            with open(path, "wb") as handle:
                np.savez(handle, **{name: value.detach().cpu().numpy() for name, value in state.items()})
        else:
            torch.save(state, path)

    def save_checkpoint(self, path: str) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        torch.save(state, path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and "scaler" in state:
            self.precision.scaler.load_state_dict(state["scaler"])

    def is_oom(self, error: BaseException) -> bool:
        return memory.is_oom(error)

    def peak_memory_bytes(self) -> int | None:
        return memory.peak_memory_bytes(self.device)

    def current_memory_bytes(self) -> int | None:
        return memory.current_memory_bytes(self.device)
