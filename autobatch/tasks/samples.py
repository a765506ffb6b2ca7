"""What the search needs to know of a task's data, framework-free: how many samples, and how large each is.

Datasets are read duck-typed (``len`` and ``[i]``), so nothing here imports a framework. Where
a sample's memory depends on its content (a sequence padded to the longest in its batch), a
window of random samples does not show the peak: :func:`sample_sizes` measures each sample, and
:func:`longest_first` orders them so a trial can train on the worst window first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from autobatch.errors import InvalidParameterError

__all__ = [
    "check_dataset",
    "dataset_length",
    "detect_sample_size",
    "is_array_pair",
    "longest_first",
    "sample_sizes",
]

#: the samples :func:`detect_sample_size` looks at to tell sequences of varying length
DETECT_SAMPLES = 64


def is_array_pair(data: Any) -> bool:
    """``(x, y)``: two numpy arrays (or array-likes with a ``shape``) of samples."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(hasattr(part, "shape") and hasattr(part, "__len__") for part in data)
    )


def check_dataset(
    name: str, data: Any, allowed: str = "a map-style Dataset (__len__ and __getitem__) or (x, y) arrays"
) -> None:
    """Fail with a one-line error unless ``data`` is a non-empty dataset of a kind the backend reads."""
    if is_array_pair(data):
        if len(data[0]) != len(data[1]):
            raise InvalidParameterError(
                name,
                f"arrays of {len(data[0])} inputs and {len(data[1])} targets",
                "inputs and targets must be as many",
            )
    elif not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise InvalidParameterError(name, type(data).__name__, f"must be {allowed}")
    if dataset_length(data) == 0:
        raise InvalidParameterError(name, "a dataset of 0 samples", "must hold at least one sample")


def dataset_length(data: Any) -> int:
    """The number of samples in a map-style dataset or an ``(x, y)`` pair of arrays."""
    return len(data[0]) if is_array_pair(data) else len(data)


def sample_sizes(
    n_samples: int, sample_at: Callable[[int], Any], sample_size: Callable[[Any], int] | None = None
) -> np.ndarray | None:
    """Each sample's size, by ``sample_size`` or as detected (:func:`detect_sample_size`); ``None`` when
    there is no size to go by or every sample has the same one (any window is then the worst)."""
    size_of = sample_size or detect_sample_size(sample_at(0))
    if size_of is None:
        return None
    sizes = np.empty(n_samples, dtype=np.int64)
    for index in range(n_samples):
        try:
            size = size_of(sample_at(index))
        except Exception as error:  # the user's function: bad input, named
            raise InvalidParameterError(
                "sample_size",
                f"an error on sample {index}: {type(error).__name__}: {error}",
                "must return an int for every sample",
            ) from None
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise InvalidParameterError("sample_size", f"{size!r} for sample {index}", "must return an int >= 0")
        sizes[index] = size
    return sizes if len(np.unique(sizes)) > 1 else None


def detect_sample_size(sample: Any) -> Callable[[Any], int] | None:
    """A sample's size when it is a dict holding sequences (token ids, masks): the longest of them.

    Other samples (an image tensor, an ``(x, y)`` tuple) give ``None``: their size cannot be told
    from their structure, and reading every sample of an augmenting dataset to find out would
    cost a pass over the data. Give ``sample_size`` for those.
    """
    if isinstance(sample, Mapping) and any(_is_sequence(value) for value in sample.values()):
        return _longest_sequence
    return None


def longest_first(sizes: np.ndarray) -> np.ndarray:
    """Sample indices from the largest size to the smallest (ties in index order)."""
    return np.argsort(-sizes, kind="stable").astype(np.int64)


def _longest_sequence(sample: Mapping) -> int:
    lengths = [len(value) for value in sample.values() if _is_sequence(value)]
    return max(lengths) if lengths else 0


def _is_sequence(value: Any) -> bool:
    """A list, or a one-dimensional array or tensor (``ndim`` 1): what a padding collator pads."""
    if isinstance(value, (str, bytes)):
        return False
    if hasattr(value, "ndim"):
        return int(value.ndim) == 1
    return isinstance(value, Sequence)
