"""Optimizers and losses for PyTorch: those a workload names, and the ``(model, batch) -> mean loss`` form
every window step takes.

A task's loss is a callable ``(model, batch)`` returning the batch's mean loss (a scalar tensor), the
batch as the collate function made it. :func:`supervised_loss` turns a ``(predictions, target)`` loss
(``nn.functional.cross_entropy``) into that form for ``(x, y)`` batches; :func:`default_loss` is what a
task without a loss gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autobatch.errors import InvalidParameterError

__all__ = [
    "BatchLoss",
    "call_model",
    "checked_loss",
    "default_loss",
    "describe",
    "has_batch_norm",
    "make_loss",
    "make_optimizer",
    "require_batch_norm_micro_batch",
    "supervised_loss",
]

#: a loss as the window step calls it: ``(model, batch) -> the batch's mean loss``
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]


def make_optimizer(name: str, parameters: Iterable[torch.nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)
    raise ValueError(f"optimizer={name!r} is not supported by the torch backend")


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss ``(predictions, target) -> mean loss`` over the batch (wrap it in :func:`supervised_loss`)."""
    if name == "cross_entropy":
        return nn.functional.cross_entropy
    if name == "mse":
        return lambda prediction, target: nn.functional.mse_loss(prediction.reshape(target.shape), target)
    raise ValueError(f"loss={name!r} is not supported by the torch backend")


def supervised_loss(loss_fn: Callable[[Any, Any], torch.Tensor]) -> BatchLoss:
    """``(model, (x, y)) -> loss_fn(model(x), y)``: a ``(predictions, target)`` loss for ``(x, y)`` batches.

    ``x`` may be a dict (``model(**x)``) or a tuple (``model(*x)``) of inputs.
    """

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return loss_fn(call_model(model, x), y)

    loss.__qualname__ = f"supervised_loss({getattr(loss_fn, '__qualname__', type(loss_fn).__name__)})"
    return loss


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A task's loss when it names none: ``model(**batch).loss`` for a dict batch (a Hugging Face model
    given ``labels``), else cross-entropy of ``model(x)`` against ``y`` for an ``(x, y)`` batch."""
    if isinstance(batch, Mapping):
        output = model(**batch)
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None:
            raise InvalidParameterError(
                "loss",
                None,
                f"must be given: the batch is a dict and the model's output ({type(output).__name__}) has no "
                "`loss` (give the labels in the batch, or a loss (model, batch) -> scalar tensor)",
            )
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return nn.functional.cross_entropy(call_model(model, x), y)
    raise InvalidParameterError(
        "loss",
        None,
        f"must be given for a batch of type {type(batch).__name__}: the default needs a dict batch whose "
        "model output has a `loss`, or an (x, y) batch",
    )


def checked_loss(value: Any) -> torch.Tensor:
    """``value`` if it is a scalar tensor, the only loss a micro-batch can be weighted by; else a one-line error.

    Reading ``dim()`` is metadata: it adds no device synchronisation to a step.
    """
    if not isinstance(value, torch.Tensor):
        raise InvalidParameterError("loss", describe(value), "must return a scalar tensor: the batch's mean loss")
    if value.dim() != 0:
        raise InvalidParameterError(
            "loss",
            Described(f"a tensor of shape {tuple(value.shape)}"),
            "must return a scalar tensor: the batch's mean loss (reduce it with .mean())",
        )
    return value


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (1d, 2d, 3d, lazy or synchronised), which in training
    mode normalises over the micro-batch and cannot train on a single sample."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def require_batch_norm_micro_batch(micro_batch_size: int) -> None:
    """Refuse a micro-batch of one sample for a model with BatchNorm, in one line, before training starts."""
    if micro_batch_size < 2:
        raise InvalidParameterError(
            "micro_batch_size",
            micro_batch_size,
            "must be >= 2 for a model with BatchNorm in training mode (it normalises over the micro-batch, "
            'and PyTorch refuses one sample: "Expected more than 1 value per channel")',
        )


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a dict of inputs, ``model(*x)`` for a tuple, else ``model(x)``."""
    if isinstance(x, torch.Tensor):  # first: the common case, and a cheaper check than Mapping's
        return model(x)
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


class Described(str):
    """A value shown in an error as the words it holds (no quotes), for values whose repr is no help."""

    def __repr__(self) -> str:
        return str(self)


def describe(value: Any) -> Any:
    """``value`` for an error message: itself when its repr is one short line, else its type's name."""
    text = repr(value)
    if len(text) <= 60 and "\n" not in text:
        return value
    return Described(f"<a {type(value).__name__}>")
