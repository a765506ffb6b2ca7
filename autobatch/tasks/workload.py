"""Workloads: the shortest form of a task, numpy arrays and a model per framework.

A workload holds its data as numpy arrays (each backend wraps them natively), a loss and an
optimizer by name, and, per framework, a builder of the untrained model: the same task runs on
PyTorch and TensorFlow alike. A user's own training code is a :class:`~autobatch.TorchTask` or
a :class:`~autobatch.KerasTask`; :mod:`autobatch.tasks.loading` loads any of them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autobatch.core.imports import import_object
from autobatch.core.lr_schedule import LearningRateSchedule
from autobatch.errors import InvalidParameterError, TaskLoadError

LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("adam", "sgd")

ModelBuilder = Callable[[], Any]


@dataclass
class Workload:
    """A model per framework, its data, its loss and optimizer, and a base LR/batch pair.

    ``base_batch_size`` and ``base_learning_rate`` anchor the learning-rate scaling
    rule: the learning rate known to work at the base batch. ``models`` maps a
    framework name (``"torch"``, ``"tensorflow"``) to a callable, or an import path
    ``"module:function"``, returning a fresh untrained model. ``lr_schedule`` is how the
    learning rate moves over a trial or a run (:mod:`autobatch.core.lr_schedule`: ``"cosine"``,
    ``"warmup-cosine"``, a callable ``progress -> multiplier``); ``None``: constant.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    models: Mapping[str, ModelBuilder | str]
    loss: str = "cross_entropy"
    optimizer: str = "adam"
    base_batch_size: int = 32
    base_learning_rate: float = 1e-3
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    lr_schedule: str | Callable[[float], float] | LearningRateSchedule | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidParameterError("loss", self.loss, f"must be one of {LOSSES}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidParameterError("optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if len(self.x_train) != len(self.y_train) or len(self.x_val) != len(self.y_val):
            raise InvalidParameterError(
                "x_train/y_train",
                (len(self.x_train), len(self.y_train)),
                "inputs and targets must have the same length",
            )
        if len(self.x_train) == 0 or len(self.x_val) == 0:
            raise InvalidParameterError(
                "x_train/x_val", (len(self.x_train), len(self.x_val)), "splits must not be empty"
            )
        if self.lr_schedule is not None:  # parsed once, here: trials and runs read the schedule
            self.lr_schedule = LearningRateSchedule.parse(self.lr_schedule)

    @property
    def frameworks(self) -> tuple[str, ...]:
        return tuple(self.models)

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        return len(self.y_val)

    def build_model(self, framework: str) -> Any:
        """A fresh, untrained model for ``framework``."""
        if framework not in self.models:
            raise TaskLoadError(
                f"task {self.name!r} has no model for framework {framework!r}; it has: {sorted(self.models)}"
            )
        builder = self.models[framework]
        if isinstance(builder, str):
            builder = import_object(builder)
        return builder()
