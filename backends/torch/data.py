"""A task's datasets as PyTorch reads them: the windows of a trial's plan fed through a DataLoader, each
micro-batch collated by the task's ``collate_fn`` and moved to the device when the window step reaches it.

numpy arrays become an :class:`ArrayDataset`, which fetches a whole micro-batch at once
(``__getitems__``); any other map-style dataset is read sample by sample and collated, as a
``DataLoader`` would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from autobatch.core.config import TrialBudget
from autobatch.core.windows import Window
from autobatch.tasks.samples import is_array_pair

__all__ = [
    "ArrayDataset",
    "MicroBatches",
    "as_dataset",
    "batch_samples",
    "collate_for",
    "device_batches",
    "fetch",
    "to_device",
]

Collate = Callable[[Any], Any]


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
        if isinstance(indices, np.ndarray) and indices.dtype == np.int64 and indices.flags.writeable:
            index = torch.from_numpy(indices)  # a window plan's indices, as they are: no conversion
        else:
            index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.x[index], self.y[index]


def as_dataset(data: Any, collate_fn: Collate | None) -> torch.utils.data.Dataset:
    """A task's data as a map-style dataset: ``(x, y)`` arrays wrapped, a dataset as it is.

    Arrays with no ``collate_fn`` take :class:`ArrayDataset`'s whole-micro-batch path; a
    ``collate_fn`` is given a list of samples, so with one the arrays are read sample by sample.
    """
    if not is_array_pair(data):
        return data
    if collate_fn is None:
        return ArrayDataset(data[0], data[1])
    x, y = (torch.from_numpy(np.ascontiguousarray(part)) for part in data)
    return TensorDataset(x, y)


def collate_for(dataset: Any, collate_fn: Collate | None) -> Collate:
    """The collate function a DataLoader over ``dataset`` needs: the task's, else PyTorch's default, or
    none at all for an :class:`ArrayDataset` (its ``__getitems__`` returns the batch already)."""
    if collate_fn is not None:
        return collate_fn
    return _keep_batch if isinstance(dataset, ArrayDataset) else default_collate


def fetch(dataset: Any, indices: Sequence[int], collate: Collate) -> Any:
    """The batch of ``indices``, read as a DataLoader reads it: ``__getitems__`` where the dataset has one."""
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        return collate(getitems(_indices_for(dataset, indices)))
    return collate([dataset[index] for index in _indices_for(dataset, indices)])


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it on ``device``: inside dicts, tuples, lists and other mappings
    (a Hugging Face ``BatchEncoding``), their types kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        moved = {key: to_device(value, device, non_blocking) for key, value in batch.items()}
        if type(batch) is dict:
            return moved
        try:  # a mapping type whose constructor takes other arguments: copy it, as DataLoader's pinning does
            clone = copy.copy(batch)
            clone.update(moved)  # type: ignore[attr-defined]
            return clone
        except (AttributeError, TypeError):
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(value, device, non_blocking) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device, non_blocking) for value in batch)
    return batch


def batch_samples(batch: Any) -> int:
    """The number of samples in a collated batch: the length of the first tensor (or array) in it."""
    if isinstance(batch, Mapping):
        return batch_samples(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "shape"):
        return batch_samples(batch[0])
    return len(batch)


class MicroBatches:
    """One window's micro-batches, handed out one at a time as they are iterated.

    The window step needs each micro-batch's share of the window's samples before it has
    seen them all; :attr:`sizes` gives them from the window plan. Iterate once.
    """

    def __init__(self, window: Window, source: Iterator[Any]):
        self.sizes = [len(indices) for indices in window.micro_batches]
        self._source = source

    def __iter__(self) -> Iterator[Any]:
        for _ in self.sizes:
            yield next(self._source)


def device_batches(
    dataset: Any,
    collate_fn: Collate,
    chunks: Iterable[Sequence[Window]],
    budget: TrialBudget,
    device: torch.device,
) -> Iterator[tuple[Window, MicroBatches]]:
    """Each window with its micro-batches, fetched and moved to ``device`` as the window step asks for them.

    One DataLoader (the window plan as its batch sampler, ``collate_fn`` its collate function)
    per chunk. Memory must not grow with the accumulation steps, or a wall the probe found at
    one step would not hold at eight: so no window is fetched whole. On CUDA the copy of the
    next micro-batch is started before the current one is handed out (one ahead, across window
    ends, never across chunks: the next chunk is not planned before its turn, which keeps the
    sample order); on the CPU moving is nothing, and a micro-batch is fetched when it is used
    (without workers, by :func:`fetch` directly: the same batches a DataLoader would give).
    """
    on_cuda = device.type == "cuda"
    for windows in chunks:
        if budget.num_workers == 0 and not on_cuda:
            # What a DataLoader without workers or pinning does, without its per-batch machinery
            # (about 6 µs a micro-batch, which a small model's micro-batch of a millisecond notices).
            source = (fetch(dataset, mb, collate_fn) for window in windows for mb in window.micro_batches)
            for window in windows:
                yield window, MicroBatches(window, source)
            continue
        micro_batch_indices = [_indices_for(dataset, mb) for window in windows for mb in window.micro_batches]
        loader = DataLoader(
            dataset,
            batch_sampler=micro_batch_indices,
            collate_fn=collate_fn,
            num_workers=budget.num_workers,
            pin_memory=on_cuda,
        )
        source = _moved(loader, device, ahead=on_cuda)
        for window in windows:
            yield window, MicroBatches(window, source)


def _moved(batches: Iterable[Any], device: torch.device, ahead: bool) -> Iterator[Any]:
    """``batches`` on ``device``; with ``ahead``, the next one's (asynchronous) copy is started first.

    No reference outlives its turn: a micro-batch the window step is done with is not held
    here while the next ones are fetched.
    """
    moved = (to_device(batch, device, non_blocking=ahead) for batch in batches)
    if not ahead:
        yield from moved
        return
    pending = next(moved, None)
    while pending is not None:
        current, pending = pending, next(moved, None)
        yield current
        del current


def _indices_for(dataset: Any, indices: Any) -> Any:
    """Index arrays for an :class:`ArrayDataset` (its ``__getitems__`` takes each whole); lists of ints for
    any other dataset, which may index a Python list or check for ``int``."""
    if isinstance(dataset, ArrayDataset):
        return indices
    return np.asarray(indices).tolist()


def _keep_batch(batch):
    return batch  # ArrayDataset.__getitems__ already returns the micro-batch as (x, y) tensors
