"""numpy arrays as TensorFlow data: micro-batches served by ``tf.data`` in the order a trial's plan
gives, and the traced signature of a micro-batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from autobatch.backends.tensorflow._framework import tf
from autobatch.core.windows import Window

__all__ = ["ArrayData", "batch_spec"]


class ArrayData:
    """numpy arrays served by ``tf.data`` as micro-batches, in the order the window plan gives."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        with tf.device("/CPU:0"):
            self.x = tf.convert_to_tensor(np.ascontiguousarray(x))
            self.y = tf.convert_to_tensor(np.ascontiguousarray(y))

    def micro_batches(self, index_arrays: Iterable[np.ndarray]) -> tf.data.Dataset:
        """A dataset yielding ``(x[idx], y[idx])`` for each index array, one prefetched in the background.

        One, not ``AUTOTUNE``: the tuner may deepen the buffer as it sees fit, and memory a
        probe did not see could then break a trial at the wall (see :meth:`windows`).
        """
        index_arrays = list(index_arrays)
        lengths = np.array([len(idx) for idx in index_arrays], dtype=np.int64)
        flat = np.concatenate(index_arrays).astype(np.int64) if index_arrays else np.empty(0, np.int64)
        x, y = self.x, self.y
        with tf.device("/CPU:0"):
            rows = tf.RaggedTensor.from_row_lengths(flat, lengths)
            return (
                tf.data.Dataset.from_tensor_slices(rows)
                .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
                .prefetch(1)
            )

    def windows(self, chunks: Iterable[Sequence[Window]]) -> Iterator[tuple[Window, Iterator]]:
        """Each window with its micro-batches as a lazy iterator of ``(x, y)``, one pipeline per chunk.

        Lazy, so a window's micro-batches come out of the prefetching pipeline one at a
        time, as the trainer asks for them: the data held does not grow with the accumulation
        steps, and a wall probed at one step holds at the largest the search tries.
        """
        for windows in chunks:
            batches = iter(self.micro_batches(mb for window in windows for mb in window.micro_batches))
            for window in windows:
                yield window, (next(batches) for _ in window.micro_batches)


def batch_spec(array: np.ndarray) -> tf.TensorSpec:
    """The signature of micro-batches of ``array``: its sample shape and dtype, any batch size."""
    return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))
