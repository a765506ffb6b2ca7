"""Workloads: what a trial trains, and how a task name becomes one.

A workload holds its data as numpy arrays (each backend wraps them natively) and,
per framework, a builder of the untrained model. Tasks are named by a study's short
name (``"digits-cnn"``) or by an import path ``"package.module:factory"`` whose
factory returns a :class:`Workload`, so a spawned worker can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autobatch.core.imports import import_object
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
    ``"module:function"``, returning a fresh untrained model.
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


def load_workload(task: str) -> Workload:
    """Build the workload named by a study short name or a ``module:factory`` path."""
    from autobatch.studies import STUDIES

    if not isinstance(task, str) or not task:
        raise InvalidParameterError("task", task, "must be a study name or an import path 'package.module:factory'")
    path = STUDIES.get(task, task)
    if ":" not in path:
        raise TaskLoadError(
            f"task={task!r}: no study of that name, and not an import path 'package.module:factory'; "
            f"studies: {', '.join(sorted(STUDIES))}"
        )
    try:
        factory = import_object(path)
    except TaskLoadError as error:
        raise TaskLoadError(f"task={task!r}: {error}") from None
    if isinstance(factory, Workload) or not callable(factory):
        workload = factory
    else:
        try:
            workload = factory()
        except Exception as error:  # the user's factory failed: bad input, not our crash
            raise TaskLoadError(f"task={task!r}: {path} raised {type(error).__name__}: {error}") from None
    if not isinstance(workload, Workload):
        raise TaskLoadError(f"task={task!r}: {path} gave {type(workload).__name__}, expected an autobatch.Workload")
    return workload
