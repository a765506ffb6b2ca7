"""numpy arrays as PyTorch data: a dataset that fetches a micro-batch at once, and the windows of
a trial's plan fed through a DataLoader, each micro-batch fetched and moved to the device when
the window step reaches it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from autobatch.core.config import TrialBudget
from autobatch.core.windows import Window

__all__ = ["ArrayDataset", "MicroBatches", "device_batches"]


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


class MicroBatches:
    """One window's micro-batches ``(x, y)``, handed out one at a time as they are iterated.

    The window step needs each micro-batch's share of the window's samples before it has
    seen them all; :attr:`sizes` gives them from the window plan. Iterate once.
    """

    def __init__(self, window: Window, source: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        self.sizes = [len(indices) for indices in window.micro_batches]
        self._source = source

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in self.sizes:
            yield next(self._source)


def device_batches(
    dataset: ArrayDataset, chunks: Iterable[Sequence[Window]], budget: TrialBudget, device: torch.device
) -> Iterator[tuple[Window, MicroBatches]]:
    """Each window with its micro-batches, fetched and moved to ``device`` as the window step asks for them.

    One DataLoader (the window plan as its batch sampler) per chunk. Memory must not grow
    with the accumulation steps, or a wall the probe found at one step would not hold at
    eight: so no window is fetched whole. On CUDA the copy of the next micro-batch is
    started before the current one is handed out (one ahead, across window ends, never
    across chunks: the next chunk is not planned before its turn, which keeps the sample
    order); on the CPU moving is nothing, and a micro-batch is fetched when it is used.
    """
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
        source = _moved(loader, device, ahead=on_cuda)
        for window in windows:
            yield window, MicroBatches(window, source)


def _moved(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, ahead: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` on ``device``; with ``ahead``, the next one's (asynchronous) copy is started first.

    No reference outlives its turn: a micro-batch the window step is done with is not held
    here while the next ones are fetched.
    """

    def to_device(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return x.to(device, non_blocking=ahead), y.to(device, non_blocking=ahead)

    moved = map(to_device, batches)
    if not ahead:
        yield from moved
        return
    pending = next(moved, None)
    while pending is not None:
        current, pending = pending, next(moved, None)
        yield current
        del current


def _keep_batch(batch):
    return batch  # ArrayDataset.__getitems__ already returns the micro-batch as (x, y) tensors
