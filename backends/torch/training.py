"""The optimizers and losses a workload names, made for PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["make_loss", "make_optimizer"]


def make_optimizer(name: str, parameters: Iterable[torch.nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)
    raise ValueError(f"optimizer={name!r} is not supported by the torch backend")


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss ``(predictions, target) -> mean loss`` over the batch."""
    if name == "cross_entropy":
        return nn.functional.cross_entropy
    if name == "mse":
        return lambda prediction, target: nn.functional.mse_loss(prediction.reshape(target.shape), target)
    raise ValueError(f"loss={name!r} is not supported by the torch backend")
