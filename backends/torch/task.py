"""A task as the PyTorch backend trains it: a :class:`~autobatch.TorchTask`, or a ``Workload`` turned into one.

A ``Workload`` (numpy arrays, a loss and an optimizer by name) becomes a ``TorchTask`` whose data
are its arrays, whose loss is the named one on ``(x, y)`` batches and whose optimizer is the named
one, so trials and ``autobatch train`` sessions have one code path for both. :func:`build` makes
the model, optimizer, loss and datasets of a trial or session, and checks what the user's
callables gave, naming the parameter in one line when it is wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch.backends.torch.data import as_dataset, collate_for
from autobatch.backends.torch.training import (
    BatchLoss,
    Described,
    default_loss,
    describe,
    has_batch_norm,
    make_loss,
    make_optimizer,
    supervised_loss,
)
from autobatch.errors import InvalidParameterError
from autobatch.tasks.samples import longest_first, sample_sizes
from autobatch.tasks.torch_task import TorchTask
from autobatch.tasks.workload import Workload

__all__ = ["TorchParts", "build", "evaluation_order", "torch_task"]

#: samples collated once while building, so a collate function that cannot batch them fails by name
#: before training (more than two: samples of one length are common at the start of a dataset)
FIRST_BATCH_SAMPLES = 8


def torch_task(task: Any) -> TorchTask:
    """``task`` as a :class:`TorchTask`: itself, or a ``Workload``'s arrays, loss and optimizer in that form."""
    if isinstance(task, TorchTask):
        return task
    if isinstance(task, Workload):
        return TorchTask(
            model=functools.partial(task.build_model, "torch"),
            train_data=(task.x_train, task.y_train),
            val_data=(task.x_val, task.y_val),
            loss=supervised_loss(make_loss(task.loss)),
            optimizer=functools.partial(make_optimizer, task.optimizer),
            base_batch_size=task.base_batch_size,
            base_learning_rate=task.base_learning_rate,
            name=task.name,
            description=task.description,
        )
    raise InvalidParameterError(
        "task", Described(type(task).__name__), "must be an autobatch.TorchTask or a Workload for the torch backend"
    )


@dataclass
class TorchParts:
    """What a trial or a session trains: built once, on its device."""

    task: TorchTask
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: BatchLoss
    train_set: Any
    val_set: Any
    train_collate: Callable[[Any], Any]
    val_collate: Callable[[Any], Any]
    #: a BatchNorm layer trains only on micro-batches of at least 2 samples
    has_batch_norm: bool

    @property
    def min_micro_batch(self) -> int:
        return 2 if self.has_batch_norm else 1

    @property
    def optimizer_name(self) -> str:
        return type(self.optimizer).__name__


def build(task: Any, learning_rate: float, device: torch.device) -> TorchParts:
    """The model (on ``device``, in training mode), optimizer, loss and datasets of ``task``.

    Seed torch before calling: the model's weights are drawn here.
    """
    task = torch_task(task)
    model = task.model()
    if not isinstance(model, nn.Module):
        raise InvalidParameterError("model", describe(model), "must be a callable returning a fresh torch.nn.Module")
    model = model.to(device)
    model.train()
    optimizer = (task.optimizer or _adam)(model.parameters(), learning_rate)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidParameterError(
            "optimizer", describe(optimizer), "must be a callable (parameters, lr) returning a torch.optim.Optimizer"
        )
    train_set = as_dataset(task.train_data, task.collate_fn)
    val_set = as_dataset(task.val_data, task.collate_fn)
    parts = TorchParts(
        task=task,
        model=model,
        optimizer=optimizer,
        loss=task.loss or default_loss,
        train_set=train_set,
        val_set=val_set,
        train_collate=collate_for(train_set, task.collate_fn),
        val_collate=collate_for(val_set, task.collate_fn),
        has_batch_norm=has_batch_norm(model),
    )
    _check_first_batch(parts.train_set, parts.train_collate, task.collate_fn)
    return parts


def evaluation_order(dataset: Any, count: int, sample_size: Callable[[Any], int] | None) -> np.ndarray:
    """The first ``count`` samples of ``dataset`` in the order they are evaluated: longest first where
    their sizes vary (the same mean, and the worst batch's peak comes first), else as they are."""
    sizes = sample_sizes(count, dataset.__getitem__, sample_size)
    return np.arange(count, dtype=np.int64) if sizes is None else longest_first(sizes)


def training_sizes(parts: TorchParts) -> np.ndarray | None:
    """Each training sample's size where memory depends on it (:func:`autobatch.tasks.samples.sample_sizes`)."""
    return sample_sizes(len(parts.train_set), parts.train_set.__getitem__, parts.task.sample_size)


def _check_first_batch(dataset: Any, collate: Callable[[Any], Any], collate_fn: Any) -> None:
    """Collate the first few samples once, so a collate function that cannot batch them fails in one line
    that names it, rather than in a data-loading worker's traceback mid-trial."""
    indices = list(range(min(FIRST_BATCH_SAMPLES, len(dataset))))
    getitems = getattr(dataset, "__getitems__", None)
    samples = getitems(indices) if getitems is not None else [dataset[index] for index in indices]
    try:
        collate(samples)
    except Exception as error:  # the user's collate function (or the default one on their samples)
        name = "None, so default_collate," if collate_fn is None else _name(collate_fn)
        detail = " ".join(str(error).split())[:200]
        raise InvalidParameterError(
            "collate_fn",
            Described(f"{name} (on the first {len(indices)} samples it raised {type(error).__name__}: {detail})"),
            "must turn a list of samples into a batch (variable-length samples need a padding collate_fn)",
        ) from None


def _adam(parameters, learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=learning_rate)


def _name(function: Any) -> str:
    return str(getattr(function, "__qualname__", None) or type(function).__name__)
