"""A PyTorch task in PyTorch's own terms: a model factory, datasets, a collate function, a loss and an optimizer.

Nothing here imports torch: a :class:`TorchTask` holds the user's objects and callables, and
the PyTorch backend (:mod:`autobatch.backends.torch.task`) turns them into a trial. Our window
planner cuts the batches: the datasets are read by index, a micro-batch at a time, so the
sample order and the accumulation math stay ours whatever the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from autobatch._validation import Interval, IsCallable, StrOptions, validate_fields
from autobatch.core.lr_schedule import LearningRateSchedule
from autobatch.tasks.samples import check_dataset, dataset_length

__all__ = ["LR_RULES", "TorchTask"]

#: the learning-rate rules a task may name (see :mod:`autobatch.search.space`)
LR_RULES = ("linear", "sqrt", "adascale")


@dataclass
class TorchTask:
    """What a PyTorch user trains, as they would write it.

    - ``model``: a callable returning a fresh ``torch.nn.Module`` (random weights; the trial seeds it).
    - ``train_data``, ``val_data``: map-style ``torch.utils.data.Dataset``\\ s, or ``(x, y)`` numpy
      arrays. A sample may be a tensor, a tuple or a dict of any structure.
    - ``collate_fn``: turns a list of samples into a batch (``torch.utils.data.default_collate`` if
      ``None``), as a ``DataLoader`` would; a padding collator pads each micro-batch to its own longest.
    - ``loss``: ``(model, batch) -> scalar tensor``, the **mean over the batch's samples** (the trial
      weights each micro-batch by its share of the window's samples, which makes the summed gradient
      the window's exactly). ``None``: ``model(**batch).loss`` for a dict batch whose output has a
      ``loss`` (a Hugging Face model given ``labels``), else cross-entropy of ``model(x)`` against
      ``y`` for an ``(x, y)`` batch. A loss that is a mean over tokens rather than samples (a language
      model's ``outputs.loss``) is weighted by samples too: exact when micro-batches hold alike many
      tokens, close otherwise.
    - ``optimizer``: ``(parameters, lr) -> torch.optim.Optimizer`` (AdamW with weight decay, SGD with
      any momentum, a third-party optimizer); ``None``: Adam.
    - ``lr_rule``: how the learning rate scales with the batch, ``"linear"`` or ``"sqrt"`` (or
      ``"adascale"``); ``None``: from the optimizer's class (linear for SGD-like, square root for
      Adam-like), read when the first trial builds it.
    - ``base_batch_size``, ``base_learning_rate``: a pair known to train well, which the rule scales.
    - ``sample_size``: ``sample -> int``, what a sample's memory grows with (its number of tokens).
      Given, or found (a dict sample holding sequences of varying length), every trial measures its
      peak on windows of the longest samples, so the wall holds for the worst batch of an epoch.
    - ``lr_schedule``: how the learning rate moves over each trial and over ``autobatch train``'s run,
      scaled to its length: ``"cosine"``, ``"warmup-cosine"``, ``"cosine:WARMUP:FINAL"``, a callable
      ``progress -> multiplier`` (see :mod:`autobatch.core.lr_schedule`); ``None``: constant.
    """

    model: Callable[[], Any]
    train_data: Any
    val_data: Any
    collate_fn: Callable[[list], Any] | None = None
    loss: Callable[[Any, Any], Any] | None = None
    optimizer: Callable[[Any, float], Any] | None = None
    lr_rule: str | None = None
    base_batch_size: int = 32
    base_learning_rate: float = 1e-3
    sample_size: Callable[[Any], int] | None = None
    name: str = "torch-task"
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    lr_schedule: str | Callable[[float], float] | LearningRateSchedule | None = None

    framework: ClassVar[str] = "torch"
    _parameter_constraints: ClassVar[dict] = {
        "model": [IsCallable("a callable returning a fresh torch.nn.Module")],
        "collate_fn": [IsCallable("a callable turning a list of samples into a batch"), None],
        "loss": [IsCallable("a callable (model, batch) -> scalar tensor"), None],
        "optimizer": [IsCallable("a callable (parameters, lr) -> torch.optim.Optimizer"), None],
        "lr_rule": [StrOptions(LR_RULES), None],
        "base_batch_size": [Interval(int, 1, None)],
        "base_learning_rate": [Interval(float, 0, None, closed="neither")],
        "sample_size": [IsCallable("a callable sample -> int"), None],
    }

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.lr_schedule is not None:  # parsed once, here: trials and runs read the schedule
            self.lr_schedule = LearningRateSchedule.parse(self.lr_schedule)
        check_dataset("train_data", self.train_data)
        check_dataset("val_data", self.val_data)

    @property
    def frameworks(self) -> tuple[str, ...]:
        return (self.framework,)

    @property
    def n_train(self) -> int:
        return dataset_length(self.train_data)

    @property
    def n_val(self) -> int:
        return dataset_length(self.val_data)
