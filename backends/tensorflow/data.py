"""A task's samples held in memory, served as micro-batches in the order a trial's plan gives.

:func:`read_keras_data` reads a :class:`~autobatch.tasks.keras_task.KerasTask`'s data once (an
unbatched ``tf.data.Dataset``, ``(x, y)`` arrays, or a ``keras.utils.PyDataset`` whose batches are
split into samples), as Keras's own data adapters accept it, into one column per component of
its ``(x, y)`` elements; ``x`` may be a dict or a tuple. A component whose shape varies between
elements (a sequence) is held as a ``tf.RaggedTensor`` (a dense one as its numpy array, each
micro-batch gathered and converted when it is reached) and each micro-batch is padded to its own
longest, or to ``padded_shapes`` with ``padding_value``, as ``tf.data.Dataset.padded_batch``
pads. Its dimensions that vary are ``None`` in the traced signature (:attr:`SampleData.spec`), so
a new length runs the same graph. A :class:`~autobatch.tasks.workload.Workload`'s arrays are
:class:`ArrayData`, the same thing with two dense columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.core.windows import Window
from autobatch.errors import InvalidParameterError
from autobatch.tasks.keras_task import KERAS_DATA, batching_step, is_py_dataset, is_tf_dataset
from autobatch.tasks.samples import is_array_pair, longest_first, sample_sizes

__all__ = ["ArrayData", "SampleData", "batch_spec", "common_spec", "read_keras_data"]

_ELEMENTS = "elements must be (x, y) pairs, x an array, a dict or a tuple of arrays"


class SampleData:
    """Samples as tensors on the CPU, one column per component of ``(x, y)``, cut into batches by index.

    ``structure`` is an ``(x, y)`` element whose leaves are placeholders; ``columns`` hold its
    components in ``tf.nest.flatten`` order. :attr:`sizes` is each sample's size where memory
    depends on it (see :func:`read_keras_data`), else ``None``.
    """

    def __init__(self, structure: Any, columns: Sequence[_Column], sizes: np.ndarray | None = None):
        self.structure = structure
        self.columns = list(columns)
        self.sizes = sizes
        self.n = int(self.columns[0].n)
        self.spec: tuple[Any, Any] = tf.nest.pack_sequence_as(structure, [column.spec for column in self.columns])
        # Every column a dense numpy array: batches are gathered in numpy (see _Column); else None.
        arrays = [column.array for column in self.columns if column.array is not None]
        self._arrays: list[np.ndarray] | None = arrays if len(arrays) == len(self.columns) else None

    def batch(self, indices: np.ndarray) -> tuple[Any, Any]:
        """The samples at ``indices`` as one ``(x, y)`` batch, padded to its own longest."""
        indices = np.asarray(indices, dtype=np.int64)
        with tf.device("/CPU:0"):
            if self._arrays is not None:
                return tf.nest.pack_sequence_as(
                    self.structure, [tf.convert_to_tensor(np.take(array, indices, axis=0)) for array in self._arrays]
                )
            return self._take(tf.constant(indices))

    def micro_batches(self, index_arrays: Iterable[np.ndarray]) -> Iterable[tuple[Any, Any]]:
        """The batch of each index array, in turn.

        Dense numpy columns are gathered as each batch is asked for, one batch held at a time.
        Otherwise a dataset that prefetches one batch in the background; one, not ``AUTOTUNE``:
        the tuner may deepen the buffer as it sees fit, and memory a probe did not see could
        then break a trial at the wall (see :meth:`windows`).
        """
        if self._arrays is not None:
            return (self.batch(indices) for indices in index_arrays)
        for column in self.columns:  # tensors made eagerly: inside the traced map a dense one would be a constant
            column.values  # noqa: B018
        index_arrays = list(index_arrays)
        lengths = np.array([len(idx) for idx in index_arrays], dtype=np.int64)
        flat = np.concatenate(index_arrays).astype(np.int64) if index_arrays else np.empty(0, np.int64)
        with tf.device("/CPU:0"):
            rows = tf.RaggedTensor.from_row_lengths(flat, lengths)
            return tf.data.Dataset.from_tensor_slices(rows).map(self._take).prefetch(1)

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

    def evaluation_order(self, limit: int | None) -> np.ndarray:
        """The first ``limit`` samples (all when ``None``), longest first where sizes vary: the
        evaluation's first batch is then its largest, and its peak the worst batch's."""
        count = self.n if limit is None else min(limit, self.n)
        if self.sizes is None:
            return np.arange(count, dtype=np.int64)
        return longest_first(self.sizes[:count])

    def _take(self, indices: tf.Tensor) -> tuple[Any, Any]:
        return tf.nest.pack_sequence_as(self.structure, [column.take(indices) for column in self.columns])


class ArrayData(SampleData):
    """numpy arrays ``x``, ``y`` (a :class:`~autobatch.tasks.workload.Workload`'s) served as micro-batches."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        super().__init__((0, 0), [_Column.dense(x), _Column.dense(y)])


def batch_spec(array: np.ndarray) -> tf.TensorSpec:
    """The signature of micro-batches of ``array``: its sample shape and dtype, any batch size."""
    return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))


def common_spec(train: SampleData, val: SampleData) -> tuple[Any, Any]:
    """One traced signature for training and validation batches: a dimension either leaves open is ``None``."""
    try:
        tf.nest.assert_same_structure(train.spec, val.spec)
        merged = [
            a.most_specific_common_supertype([b])
            for a, b in zip(tf.nest.flatten(train.spec), tf.nest.flatten(val.spec), strict=True)
        ]
    except (TypeError, ValueError):
        merged = [None]
    if any(spec is None for spec in merged):
        raise InvalidParameterError(
            "val_data",
            f"elements of {val.spec}",
            f"must have the structure and dtypes of train_data's elements, {train.spec}",
        )
    return tf.nest.pack_sequence_as(train.spec, merged)


def read_keras_data(
    name: str,
    data: Any,
    *,
    padded_shapes: Any = None,
    padding_value: Any = None,
    sample_size: Callable[[Any], int] | None = None,
) -> SampleData:
    """Read ``data`` (a :class:`~autobatch.tasks.keras_task.KerasTask`'s ``train_data`` or ``val_data``) into memory.

    Each sample's size, where memory depends on it: ``sample_size(element)`` for every element
    (``element`` the ``(x, y)`` pair as numpy arrays), or else, where a component's shape varies
    between elements, the largest over those components of the product of their varying
    dimensions (a sequence's length). Dimensions that ``padded_shapes`` fixes do not count:
    every batch is padded to them.
    """
    structure, raw = _read_components(name, data)
    n = len(raw[0]) if isinstance(raw[0], list) else int(raw[0].shape[0])
    if n == 0:
        raise InvalidParameterError(name, "a dataset of 0 samples", "must hold at least one sample")
    shapes = _per_component(structure, padded_shapes, "padded_shapes", _shape)
    padding = _per_component(structure, padding_value, "padding_value", lambda value: value)
    columns = [_column(name, values, shape, pad) for values, shape, pad in zip(raw, shapes, padding, strict=True)]
    if sample_size is not None:

        def sample_at(index: int) -> Any:
            return tf.nest.pack_sequence_as(structure, [values[index] for values in raw])

        sizes = sample_sizes(n, sample_at, sample_size)
    else:
        sizes = _detected_sizes(columns)
    return SampleData(structure, columns, sizes)


class _Column:
    """One component of every sample: a dense numpy array, or a ragged tensor each batch of which is padded.

    A dense column stays the numpy array it came as (:attr:`array`): a TensorFlow copy of the
    whole split would be held beside it for the trial's life, about 30 MiB of synthetic-images
    that a training loop which converts batch by batch does not hold, and the wall found under
    a memory budget would be that much lower. Its tensor (:attr:`values`) is made only for a
    pipeline that also holds ragged columns, and kept.

    ``varying``: each sample's size along the dimensions that vary and are padded per batch
    (the product of those dimensions), ``None`` when no dimension does.
    """

    def __init__(
        self,
        values: Any,
        spec: tf.TensorSpec,
        padding: Any = None,
        varying: np.ndarray | None = None,
        array: np.ndarray | None = None,
    ):
        self._values = values
        self.array = array
        self.spec = spec
        self.padding = padding
        self.varying = varying
        if array is not None:
            self.n = len(array)
        else:
            self.n = int(values.shape[0]) if not isinstance(values, tf.RaggedTensor) else int(values.nrows())

    @classmethod
    def dense(cls, array: np.ndarray) -> _Column:
        array = np.ascontiguousarray(array)
        return cls(None, batch_spec(array), array=array)

    @property
    def values(self) -> Any:
        """The column as a tensor (a dense column's made at the first use, on the CPU)."""
        if self._values is None:
            with tf.device("/CPU:0"):
                self._values = tf.convert_to_tensor(self.array)
        return self._values

    def take(self, indices: tf.Tensor) -> tf.Tensor:
        taken = tf.gather(self.values, indices)
        if isinstance(taken, tf.RaggedTensor):
            # as padded_batch pads: to the batch's longest, or to the shape given
            taken = taken.to_tensor(default_value=self.padding, shape=self.spec.shape)
        return taken


def _read_components(name: str, data: Any) -> tuple[Any, list[Any]]:
    """The element structure, and per component either one array of every sample or a list of per-sample arrays."""
    if is_array_pair(data):
        structure = (0, 0)
        return structure, [list(part) if np.asarray(part).dtype == object else np.asarray(part) for part in data]
    if is_tf_dataset(data):
        batching = batching_step(data)
        if batching is not None:
            raise InvalidParameterError(
                name,
                f"a tf.data.Dataset batched upstream ({batching})",
                "must be unbatched (drop .batch()/.padded_batch(), or call .unbatch()): autobatch cuts the batches",
            )
        return _read_elements(name, data.as_numpy_iterator(), batched=False)
    if is_py_dataset(data):
        batches = data.num_batches
        if batches is None:
            raise InvalidParameterError(name, "an infinite PyDataset (num_batches None)", "must be finite: one epoch")
        return _read_elements(name, (data[index] for index in range(batches)), batched=True)
    raise InvalidParameterError(name, type(data).__name__, f"must be {KERAS_DATA}")


def _read_elements(name: str, elements: Iterable[Any], *, batched: bool) -> tuple[Any, list[Any]]:
    """Elements (or a PyDataset's batches) in one pass: per component the arrays of every element (or batch)."""
    structure: Any = None
    parts: list[list[np.ndarray]] = []
    for element in elements:
        if isinstance(element, list):  # Keras's adapters take a list (x, y) as a tuple
            element = tuple(element)
        if not (isinstance(element, tuple) and len(element) == 2):
            what = "batches" if batched else "elements"
            raise InvalidParameterError(name, f"{what} of {type(element).__name__}", _ELEMENTS)
        leaves = [np.asarray(keras.ops.convert_to_numpy(leaf)) for leaf in tf.nest.flatten(element)]
        if structure is None:
            structure = tf.nest.map_structure(lambda _: 0, element)
            parts = [[] for _ in leaves]
        else:
            try:
                tf.nest.assert_same_structure(structure, element, check_types=False)
            except (TypeError, ValueError):
                raise InvalidParameterError(
                    name, f"an element {_describe(element)}", "every element must have the structure of the first"
                ) from None
        if batched and len({len(leaf) for leaf in leaves}) > 1:
            raise InvalidParameterError(
                name,
                "a batch whose components have different lengths",
                "every component of a batch must hold its samples",
            )
        for column, leaf in zip(parts, leaves, strict=True):
            column.append(leaf)
    if structure is None:
        raise InvalidParameterError(name, "a dataset of 0 samples", "must hold at least one sample")
    if not batched:
        return structure, parts
    columns: list[Any] = []
    for batches in parts:  # a PyDataset's batches: joined where their shapes agree, else split into samples
        if len({batch.shape[1:] for batch in batches}) == 1:
            columns.append(np.concatenate(batches))
        else:
            columns.append([sample for batch in batches for sample in batch])
    return structure, columns


def _column(name: str, values: Any, padded_shape: tf.TensorShape | None, padding: Any) -> _Column:
    """A column of ``values`` (one array, or a list of per-sample arrays), padded to ``padded_shape`` where given."""
    if not isinstance(values, list) or len({np.shape(value) for value in values}) == 1:
        stacked = np.stack(values) if isinstance(values, list) else values  # no dimension varies
        fixed = _fixed_sizes(name, padded_shape, np.array(stacked.shape[1:], np.int64))
        widths = [(0, 0)] + [
            (0, 0 if size is None else size - length) for size, length in zip(fixed, stacked.shape[1:], strict=True)
        ]
        if any(width for _, width in widths):  # padded to a larger shape once, here
            stacked = np.pad(stacked, widths, constant_values=_padding_for(stacked.dtype, padding))
        return _Column.dense(stacked)
    arrays = [np.asarray(value) for value in values]
    ranks = {array.ndim for array in arrays}
    if len(ranks) > 1:
        raise InvalidParameterError(
            name, f"a component of ranks {sorted(ranks)}", "a component must have the same rank in every element"
        )
    shape_of = np.array([array.shape for array in arrays], dtype=np.int64)
    longest = shape_of.max(axis=0)
    varies = shape_of.min(axis=0) != longest
    fixed = _fixed_sizes(name, padded_shape, longest)
    # Ragged up to the last dimension padded per batch: to_tensor pads ragged dimensions only.
    padded = varies | np.array(
        [size is not None and size > length for size, length in zip(fixed, longest, strict=True)]
    )
    ragged_rank = int(np.flatnonzero(padded).max()) + 1
    ragged = _ragged(arrays, ragged_rank)
    dims = [
        size if size is not None else (None if vary else int(length))
        for size, vary, length in zip(fixed, varies, longest, strict=True)
    ]
    spec = tf.TensorSpec((None, *dims), ragged.dtype)
    counted = varies & np.array([size is None for size in fixed])  # a size padded_shapes fixes is every batch's
    varying = np.prod(np.where(counted, shape_of, 1), axis=1) if counted.any() else None
    return _Column(ragged, spec, _padding_for(ragged.dtype.as_numpy_dtype, padding), varying)


def _fixed_sizes(name: str, padded_shape: tf.TensorShape | None, longest: np.ndarray) -> list[int | None]:
    """The size ``padded_shape`` fixes in each sample dimension (``None``: the batch's longest)."""
    if padded_shape is None:
        return [None] * len(longest)
    if padded_shape.rank != len(longest):
        raise InvalidParameterError(
            "padded_shapes", str(padded_shape), f"must have rank {len(longest)}, as the elements of its component"
        )
    sizes = padded_shape.as_list()
    for axis, (size, length) in enumerate(zip(sizes, longest, strict=True)):
        if size is not None and length > size:
            raise InvalidParameterError(
                "padded_shapes",
                str(padded_shape),
                f"is shorter than an element of {name} ({int(length)} in dimension {axis})",
            )
    return sizes


def _ragged(arrays: list[np.ndarray], ragged_rank: int) -> tf.RaggedTensor:
    """Per-sample arrays of one rank as a RaggedTensor whose first ``ragged_rank`` sample dimensions are ragged."""
    values = np.concatenate([array.reshape(-1, *array.shape[ragged_rank:]) for array in arrays])
    lengths = [
        np.concatenate([np.full(int(np.prod(array.shape[:level])), array.shape[level], np.int64) for array in arrays])
        for level in range(ragged_rank)
    ]
    with tf.device("/CPU:0"):
        return tf.RaggedTensor.from_nested_row_lengths(values, lengths)


def _detected_sizes(columns: Sequence[_Column]) -> np.ndarray | None:
    varying = [column.varying for column in columns if column.varying is not None]
    if not varying:
        return None
    sizes = np.max(np.stack(varying), axis=0).astype(np.int64)
    return sizes if len(np.unique(sizes)) > 1 else None


def _per_component(structure: Any, given: Any, parameter: str, convert: Callable[[Any], Any]) -> list[Any]:
    """``given`` for each component of ``structure``: ``None`` for none, one value for every component
    (``padding_value`` only), or a structure like the elements' (as ``padded_batch`` takes them)."""
    count = len(tf.nest.flatten(structure))
    if given is None:
        return [None] * count
    if parameter == "padding_value" and np.ndim(given) == 0 and not isinstance(given, (tuple, list, dict)):
        return [given] * count
    try:
        return [None if value is None else convert(value) for value in _flatten_up_to(structure, given)]
    except (KeyError, IndexError, TypeError, ValueError):
        raise InvalidParameterError(
            parameter, given, f"must match the structure of the elements, {structure}: one entry per component"
        ) from None


def _flatten_up_to(structure: Any, given: Any) -> list[Any]:
    """``given``'s entries at ``structure``'s leaves, in ``tf.nest.flatten`` order (dict keys sorted).

    By hand: ``tf.nest`` has no public ``flatten_up_to``, and a shape (a list) in ``given`` is a
    leaf here where ``tf.nest.flatten`` would open it.
    """
    if isinstance(structure, dict):
        if set(given) != set(structure):
            raise KeyError(sorted(given))
        return [entry for key in sorted(structure) for entry in _flatten_up_to(structure[key], given[key])]
    if isinstance(structure, (tuple, list)):
        if not isinstance(given, (tuple, list)) or len(given) != len(structure):
            raise ValueError(given)
        return [entry for part, value in zip(structure, given, strict=True) for entry in _flatten_up_to(part, value)]
    return [given]


def _shape(value: Any) -> tf.TensorShape:
    return tf.TensorShape([None if size is None or size == -1 else int(size) for size in value])


def _padding_for(dtype: Any, value: Any) -> Any:
    """What padding is filled with: ``value`` in the component's dtype, or as ``padded_batch`` pads, 0 or ``b""``."""
    dtype = np.dtype(dtype)
    if dtype.kind in "SUO":
        return b"" if value is None else value
    return np.zeros((), dtype) if value is None else np.asarray(value).astype(dtype)


def _describe(element: Any) -> str:
    return str(tf.nest.map_structure(lambda leaf: getattr(leaf, "shape", type(leaf).__name__), element))
