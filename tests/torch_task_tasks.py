"""PyTorch tasks in PyTorch's own terms (TorchTask), for tests/test_torch_task.py; importable by trial workers.

A tiny language model over dict batches (``input_ids``, ``attention_mask``, ``labels``) padded per
batch by :func:`pad_collate`, whose output has a ``.loss``; a classifier over a tuple Dataset with a
custom loss and AdamW; and a BatchNorm model over arrays.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from autobatch import TorchTask

VOCAB = 12
PAD = 0
#: what TinyLM saw, while :data:`RECORD` is on: (training, padded width, each sample's real length)
SEEN: list[tuple[bool, int, list[int]]] = []
RECORD = {"on": False}


class TinyLM(nn.Module):
    """Token classes from each token and its sequence's masked mean: padding changes nothing real.

    Its ``loss`` is each sample's mean over its non-pad tokens, then the mean over samples:
    a mean over the batch's samples, as a TorchTask's loss must be.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, dtype=dtype)
        self.head = nn.Linear(8, VOCAB, dtype=dtype)

    def forward(self, input_ids, attention_mask, labels=None):
        if RECORD["on"]:
            SEEN.append((self.training, int(input_ids.shape[1]), attention_mask.sum(1).tolist()))
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        hidden = self.embed(input_ids)
        context = (hidden * mask).sum(1) / mask.sum(1)
        logits = self.head(torch.tanh(hidden + context.unsqueeze(1)))
        loss = None
        if labels is not None:
            per_token = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            real = (labels != -100).to(per_token.dtype)
            loss = ((per_token * real).sum(1) / real.sum(1)).mean()
        return SimpleNamespace(loss=loss, logits=logits)


class Sequences(torch.utils.data.Dataset):
    """Token sequences of varying length as dict samples."""

    def __init__(self, n: int, seed: int, min_length: int = 2, max_length: int = 9):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_length, max_length + 1, (n,), generator=generator).tolist()
        self.samples = []
        for length in lengths:
            ids = torch.randint(1, VOCAB, (length,), generator=generator)
            self.samples.append(
                {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids}
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def pad_collate(samples: list[dict]) -> dict:
    """Pads every field to the batch's longest sample (``labels`` with -100, which the loss ignores)."""
    longest = max(len(sample["input_ids"]) for sample in samples)
    padding = {"input_ids": PAD, "attention_mask": 0, "labels": -100}
    batch = {}
    for key, value in padding.items():
        rows = [nn.functional.pad(sample[key], (0, longest - len(sample[key])), value=value) for sample in samples]
        batch[key] = torch.stack(rows)
    return batch


def sequence_length(sample: dict) -> int:
    return len(sample["input_ids"])


def adamw(parameters, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)


def tiny_lm_task() -> TorchTask:
    """The model's own ``outputs.loss`` (the default), a padding collator, AdamW, sizes by length."""
    return TorchTask(
        model=TinyLM,
        train_data=Sequences(64, seed=0),
        val_data=Sequences(24, seed=1),
        collate_fn=pad_collate,
        optimizer=adamw,
        sample_size=sequence_length,
        base_batch_size=8,
        base_learning_rate=3e-3,
        name="tiny-lm",
    )


class Points(torch.utils.data.Dataset):
    """Two Gaussian blobs as ``(x, y)`` tuples: a Dataset, not arrays."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 2, size=n)
        self.x = (rng.normal(size=(n, 4)) + 2.0 * self.y[:, None]).astype(np.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return torch.from_numpy(self.x[index]), int(self.y[index])


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def smoothed_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


def adamw_task() -> TorchTask:
    """A custom loss (label smoothing) and AdamW with weight decay, over tuple samples."""
    return TorchTask(
        model=classifier,
        train_data=Points(256, seed=0),
        val_data=Points(64, seed=1),
        loss=smoothed_loss,
        optimizer=adamw,
        base_batch_size=16,
        base_learning_rate=1e-2,
        name="points-adamw",
    )


def batch_norm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def batch_norm_task() -> TorchTask:
    """A BatchNorm model over ``(x, y)`` arrays."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=96).astype(np.int64)
    x = (rng.normal(size=(96, 4)) + y[:, None]).astype(np.float32)
    return TorchTask(model=batch_norm_model, train_data=(x[:64], y[:64]), val_data=(x[64:], y[64:]), name="bn")
