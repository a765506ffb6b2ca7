"""numpy arrays as PyTorch data: a dataset that fetches a micro-batch at once, and the windows of
a trial's plan on the device, through a DataLoader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from autobatch.core.config import TrialBudget
from autobatch.core.windows import Window

__all__ = ["ArrayDataset", "device_batches"]

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


class ArrayDataset(torch.utils.data.Dataset):
    """numpy arrays as a map-style dataset that fetches a whole micro-batch at once."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Iterable[int]):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.x[index], self.y[index]


def device_batches(
    dataset: ArrayDataset, chunks: Iterable[Sequence[Window]], budget: TrialBudget, device: torch.device
) -> Iterator[tuple[Window, MicroBatches]]:
    """Each window with its micro-batches on ``device``; one DataLoader (the window plan as its batch sampler) per chunk."""
    on_cuda = device.type == "cuda"
    for windows in chunks:
        # index arrays, not lists: ArrayDataset.__getitems__ takes each whole
        micro_batch_indices: list[Any] = [mb for window in windows for mb in window.micro_batches]
        loader = DataLoader(
            dataset,
            batch_sampler=micro_batch_indices,
            collate_fn=_keep_batch,
            num_workers=budget.num_workers,
            pin_memory=on_cuda,
        )
        batches = iter(loader)
        for window in windows:
            yield (
                window,
                [
                    (x.to(device, non_blocking=on_cuda), y.to(device, non_blocking=on_cuda))
                    for x, y in (next(batches) for _ in window.micro_batches)
                ],
            )


def _keep_batch(batch):
    return batch  # ArrayDataset.__getitems__ already returns the micro-batch as (x, y) tensors
