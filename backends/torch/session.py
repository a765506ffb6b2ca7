"""What ``autobatch train`` needs from PyTorch: a model of the workload trained window by window.

The loop over epochs, the progress and the checkpoints' timing live in :mod:`autobatch.training`,
framework-free; it reaches this session through ``TorchBackend.training_session``.
"""

from __future__ import annotations

import numpy as np
import torch

from autobatch.backends.base import TrainingSession
from autobatch.backends.torch import memory
from autobatch.backends.torch.accumulate import evaluate
from autobatch.backends.torch.adaptive import AdaptiveMicroBatcher
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.training import make_loss, make_optimizer
from autobatch.core.adaptive import MicroBatchController
from autobatch.core.config import TrialConfig
from autobatch.tasks.workload import Workload

__all__ = ["TorchTrainingSession"]


class TorchTrainingSession(TrainingSession):
    """A PyTorch model of ``workload`` trained window by window, at the micro-batch ``controller`` keeps."""

    def __init__(
        self,
        workload: Workload,
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
        self.model = workload.build_model("torch").to(self.device)
        self.model.train()
        self.optimizer = make_optimizer(workload.optimizer, self.model.parameters(), config.learning_rate)
        self.loss_fn = make_loss(workload.loss)
        self.precision = MixedPrecision(self.device, enabled=mixed_precision)
        self.batcher = AdaptiveMicroBatcher(
            self.model,
            self.optimizer,
            self.loss_fn,
            precision=self.precision,
            device=self.device if self.on_cuda else None,
            controller=controller,
        )
        self.x = torch.from_numpy(np.ascontiguousarray(workload.x_train))
        self.y = torch.from_numpy(np.ascontiguousarray(workload.y_train))

    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        index = torch.as_tensor(indices, dtype=torch.long)
        x, y = self.x[index], self.y[index]
        if self.on_cuda:
            x, y = x.pin_memory(), y.pin_memory()
        loss = self.batcher.step(x, y, epoch=epoch)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
        try:
            return evaluate(self.model, self.loss_fn, x, y, batch_size, self.device, self.precision)
        finally:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)

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
