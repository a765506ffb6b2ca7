"""Tasks that are wrong in the ways a user's first task often is, for tests/test_byo_errors.py."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from autobatch import TorchTask
from tests.torch_task_tasks import Points, classifier


def _points_task(**fields) -> TorchTask:
    return TorchTask(
        **{"model": classifier, "train_data": Points(128, seed=0), "val_data": Points(32, seed=1), **fields}
    )


def model_is_not_a_module() -> TorchTask:
    """The factory returns the model's weights, not the model."""
    return _points_task(model=lambda: classifier().state_dict())


def loss_is_not_a_scalar() -> TorchTask:
    """The loss is left per sample (``reduction="none"``)."""

    def per_sample(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    return _points_task(loss=per_sample)


def collate_fails() -> TorchTask:
    """A collate function written for dict samples, given tuples."""

    def by_key(samples):
        return {"x": torch.stack([sample["x"] for sample in samples])}

    return _points_task(collate_fn=by_key)


def empty_training_split() -> TorchTask:
    x = np.zeros((0, 4), np.float32)
    return _points_task(train_data=(x, np.zeros(0, np.int64)))
