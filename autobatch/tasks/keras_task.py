"""A Keras task in Keras's own terms: a factory of a compiled model, and its data.

Nothing here imports TensorFlow: a :class:`KerasTask` holds the user's factory and data, and
the TensorFlow backend reads the loss, the optimizer and its settings from ``compile``. The
data is read once into memory and cut by our window planner, so sample order and the
accumulation math stay ours whatever the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from autobatch._validation import Interval, IsCallable, StrOptions, validate_fields
from autobatch.core.lr_schedule import LearningRateSchedule
from autobatch.errors import InvalidParameterError
from autobatch.tasks.samples import check_dataset, is_array_pair
from autobatch.tasks.torch_task import LR_RULES

__all__ = ["KerasTask", "batching_step", "is_py_dataset", "is_tf_dataset"]

KERAS_DATA = "an unbatched tf.data.Dataset, (x, y) arrays or a keras.utils.PyDataset"


@dataclass
class KerasTask:
    """What a Keras user trains, as they would write it.

    - ``model``: a callable returning a **compiled** ``keras.Model``. The loss (and any
      regularisation losses of its layers), the optimizer's class and settings, and the metrics
      come from ``compile``; the trial sets the optimizer's learning rate to the one searched.
    - ``train_data``, ``val_data``: an **unbatched** ``tf.data.Dataset`` of ``(x, y)`` elements,
      ``(x, y)`` numpy arrays, or a ``keras.utils.PyDataset`` (its batches are split into samples).
      A tf.data pipeline is read once into memory, an epoch of its elements: augmentation that
      differs per epoch is seen once.
    - ``padded_shapes``, ``padding_value``: for elements of varying shape, as
      ``tf.data.Dataset.padded_batch`` takes them; ``None`` pads each micro-batch to its longest.
    - ``lr_rule``, ``base_batch_size``, ``base_learning_rate``, ``sample_size``: as in
      :class:`autobatch.TorchTask`. Elements of varying length are found without ``sample_size``:
      every trial then measures its peak on windows of the longest elements.
    - ``lr_schedule``: as in :class:`autobatch.TorchTask`; the trial assigns the optimizer's
      ``learning_rate`` variable before each window, so the traced step is not traced again.

    The loss must be a mean over the batch (Keras's default reduction, ``"sum_over_batch_size"``):
    each micro-batch's loss is weighted by its share of the window's samples.
    """

    model: Callable[[], Any]
    train_data: Any
    val_data: Any
    padded_shapes: Any = None
    padding_value: Any = None
    lr_rule: str | None = None
    base_batch_size: int = 32
    base_learning_rate: float = 1e-3
    sample_size: Callable[[Any], int] | None = None
    name: str = "keras-task"
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    lr_schedule: str | Callable[[float], float] | LearningRateSchedule | None = None

    framework: ClassVar[str] = "tensorflow"
    _parameter_constraints: ClassVar[dict] = {
        "model": [IsCallable("a callable returning a compiled keras.Model")],
        "lr_rule": [StrOptions(LR_RULES), None],
        "base_batch_size": [Interval(int, 1, None)],
        "base_learning_rate": [Interval(float, 0, None, closed="neither")],
        "sample_size": [IsCallable("a callable element -> int"), None],
    }

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.lr_schedule is not None:  # parsed once, here: trials and runs read the schedule
            self.lr_schedule = LearningRateSchedule.parse(self.lr_schedule)
        for name in ("train_data", "val_data"):
            _check_keras_data(name, getattr(self, name))
        # Through the cached lengths: a pipeline of unknown cardinality is counted once, here.
        empty = [name for name, n in (("train_data", "n_train"), ("val_data", "n_val")) if _empty(self, name, n)]
        if empty:
            raise InvalidParameterError(empty[0], "a dataset of 0 samples", "must hold at least one sample")

    @property
    def frameworks(self) -> tuple[str, ...]:
        return (self.framework,)

    @cached_property
    def n_train(self) -> int:  # cached: a pipeline of unknown cardinality is counted by reading it
        return keras_data_length(self.train_data)

    @cached_property
    def n_val(self) -> int:
        return keras_data_length(self.val_data)


def is_tf_dataset(data: Any) -> bool:
    """A ``tf.data.Dataset``, told by its methods (no TensorFlow import)."""
    return hasattr(data, "element_spec") and hasattr(data, "as_numpy_iterator")


def is_py_dataset(data: Any) -> bool:
    """A ``keras.utils.PyDataset`` (batches by index), told by its class's ancestry."""
    return any(klass.__name__ == "PyDataset" for klass in type(data).__mro__)


def keras_data_length(data: Any) -> int:
    """The number of samples: read from the arrays, the dataset's cardinality, or by counting."""
    if is_array_pair(data):
        return len(data[0])
    if is_tf_dataset(data):
        cardinality = int(data.cardinality())
        return cardinality if cardinality >= 0 else sum(1 for _ in data)
    if is_py_dataset(data):
        return sum(len(_first_leaf(data[index])) for index in range(len(data)))
    raise InvalidParameterError("train_data", type(data).__name__, f"must be {KERAS_DATA}")


def batching_step(dataset: Any) -> str | None:
    """The class of a batching step in ``dataset``'s pipeline that no ``.unbatch()`` undoes, else ``None``.

    The pipeline is walked through ``_inputs()`` (tf.data has no public way to ask): a batched
    dataset behind a ``.map()`` or ``.prefetch()`` would otherwise be read as samples of batches.
    """
    pending = [dataset]
    while pending:
        step = pending.pop()
        name = type(step).__name__
        if "Unbatch" in name:
            continue
        if "Batch" in name or "GroupByWindow" in name:  # batch, padded_batch, ragged_batch, bucket_by_sequence_length
            return name.lstrip("_")
        inputs = getattr(step, "_inputs", None)
        pending.extend(inputs() if callable(inputs) else [])
    return None


def _check_keras_data(name: str, data: Any) -> None:
    if is_tf_dataset(data):
        if batching_step(data) is not None:  # anywhere in the pipeline: its elements would be batches
            raise InvalidParameterError(
                name,
                "a batched tf.data.Dataset",
                "must be unbatched (drop .batch()/.padded_batch(), or call .unbatch()): autobatch cuts the batches",
            )
        cardinality = int(data.cardinality())
        if cardinality == -1:  # tf.data.INFINITE_CARDINALITY
            raise InvalidParameterError(
                name, "an infinite tf.data.Dataset (.repeat())", "must be finite: one epoch of elements"
            )
        return  # its length, which may take reading it, is checked once, by __post_init__
    if is_py_dataset(data):
        if len(data) == 0:
            raise InvalidParameterError(name, "a PyDataset of 0 batches", "must hold at least one sample")
        return
    check_dataset(name, data, allowed=KERAS_DATA)
    if not is_array_pair(data):
        raise InvalidParameterError(name, type(data).__name__, f"must be {KERAS_DATA}")


def _empty(task: KerasTask, data_field: str, length_field: str) -> bool:
    """A tf.data pipeline with no elements (arrays and PyDatasets are checked when the field is)."""
    return is_tf_dataset(getattr(task, data_field)) and getattr(task, length_field) == 0


def _first_leaf(batch: Any) -> Any:
    """The first array of a PyDataset batch ``(x, y)`` or ``x``, nested in tuples or dicts."""
    while isinstance(batch, (tuple, list, dict)):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return batch
