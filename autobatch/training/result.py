"""What a training run gives back: :class:`TrainResult`, or one of its errors.

Shared by the calling side (:mod:`autobatch.training.supervisor` builds the result and raises the
errors) and the training process (:mod:`autobatch.training.child`), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autobatch.core.adaptive import Adaptation
from autobatch.core.config import TrialConfig
from autobatch.errors import AutobatchError

__all__ = ["TrainResult", "TrainingError", "TrainingOOMError", "eval_oom_message"]


class TrainingError(AutobatchError):
    """Training stopped before it finished; the message says why, in one line."""


class TrainingOOMError(TrainingError):
    """Training ran out of memory and could not adapt (or was not asked to).

    ``step`` (1-based optimizer step) and ``micro_batch_size`` say where, when known.
    """

    def __init__(self, message: str, *, step: int | None = None, micro_batch_size: int | None = None):
        super().__init__(message)
        self.step = step
        self.micro_batch_size = micro_batch_size


@dataclass
class TrainResult:
    """What a training run did.

    ``config`` is the starting config; its effective batch is what every optimizer
    step trained on (``effective_batch_sizes`` lists the distinct sample counts of the
    steps: the effective batch, and a shorter last window of an epoch if the training
    set does not divide). ``adaptations`` lists every change of micro-batch with its
    step and cause. ``samples_per_second`` is over the training time, everything
    included (redone windows, restarts) but the start-up and the evaluation.
    ``restarts`` counts new processes started after OOM crashes. Memory figures are
    bytes, measured as for a trial: ``baseline_memory_bytes`` once the model is built,
    ``peak_memory_bytes`` the most the (last) training process used.
    """

    task: str
    backend: str
    device: str
    config: TrialConfig
    epochs: int
    adaptive: bool
    val_loss: float
    train_loss: float | None
    epoch_losses: list[float]
    samples_per_second: float | None
    samples_seen: int
    steps: int
    effective_batch_sizes: list[int]
    adaptations: list[Adaptation]
    final_micro_batch_size: int
    max_micro_batch_size: int
    eval_batch_size: int
    memory_budget_bytes: int | None
    peak_memory_bytes: int | None
    baseline_memory_bytes: int | None = None
    restarts: int = 0
    output: str | None = None
    study_name: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def effective_batch_size(self) -> int:
        return self.config.effective_batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "backend": self.backend,
            "device": self.device,
            "config": self.config.to_dict(),
            "effective_batch_size": self.effective_batch_size,
            "effective_batch_sizes": self.effective_batch_sizes,
            "epochs": self.epochs,
            "adaptive": self.adaptive,
            "val_loss": self.val_loss,
            "train_loss": self.train_loss,
            "epoch_losses": self.epoch_losses,
            "samples_per_second": self.samples_per_second,
            "samples_seen": self.samples_seen,
            "steps": self.steps,
            "adaptations": [adaptation.to_dict() for adaptation in self.adaptations],
            "final_micro_batch_size": self.final_micro_batch_size,
            "max_micro_batch_size": self.max_micro_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "baseline_memory_bytes": self.baseline_memory_bytes,
            "restarts": self.restarts,
            "output": self.output,
            "study_name": self.study_name,
            "timings": self.timings,
        }


def eval_oom_message(batch: int, detail: str, adaptive: bool) -> str:
    """The message for an OOM in evaluation at ``batch`` samples, with what to do about it."""
    advice = (
        "raise the memory budget"
        if adaptive and batch == 1
        else f"give a smaller --eval-batch-size (e.g. {max(1, batch // 2)})"
    )
    return f"out of memory in evaluation, after training, at a batch of {batch} samples ({detail}); {advice}"
