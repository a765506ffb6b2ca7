"""A recommendation as Hugging Face ``TrainingArguments``, or applied to a ``Trainer`` already built.

::

    from autobatch.integrations.huggingface import training_arguments

    args = training_arguments(result, output_dir="out", num_train_epochs=3)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)

sets ``per_device_train_batch_size`` (the micro-batch), ``gradient_accumulation_steps`` and
``learning_rate``, and ``per_device_eval_batch_size`` from the recommendation's
``eval_batch_size``: the largest micro-batch the study's probe trained and evaluated within the
memory budget (evaluation OOM is its own failure, transformers #32215). Where the study has
none, the eval batch is yours (or Hugging Face's default, 8).

**Overrides.** The three tuned numbers are one config: an override that contradicts one of them
is refused (change the recommendation instead: ``dataclasses.replace(rec, ...)``, so the change
is yours and explicit). ``per_device_eval_batch_size`` may be smaller than the recommended one,
not larger. ``auto_find_batch_size=True`` is refused: on an OOM it halves the batch without
raising the accumulation, so the effective batch changes under the learning rate (transformers
PR #33281).

**A Trainer already built** (:func:`apply_to_trainer`). ``Trainer.__init__`` copies the batch
size into ``trainer._train_batch_size``, which the train dataloader reads (transformers 5.24,
``trainer.py``; its own hyperparameter search sets it again the same way);
``gradient_accumulation_steps`` and ``learning_rate`` are read from ``trainer.args`` in
``train()`` (the optimizer is created there) and the eval batch size in each
``get_eval_dataloader``. So the arguments and that copy are set before ``train()``. A
``TrainerCallback`` alone cannot do it: ``on_init_end`` comes after the copy, ``on_train_begin``
after the dataloader and optimizer are built. :class:`AutobatchTrainerCallback` therefore checks,
at ``on_train_begin``, that the run is the recommended one, and stops it with an error if a
subclass or an optimizer of your own has changed it.

The recommendation is per device, as the study's budget was one device's: on ``n`` devices the
effective batch is ``n`` × micro-batch × accumulation.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import transformers

from autobatch.errors import AutobatchError, InvalidParameterError
from autobatch.integrations._recommendation import Recommendation, load_recommendation

__all__ = ["AutobatchTrainerCallback", "RecommendationMismatchError", "apply_to_trainer", "training_arguments"]

logger = logging.getLogger(__name__)

_TUNED = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate")
_EFFECTIVE_BATCH_NOTE = "it halves the batch without raising the accumulation, so the effective batch changes"


class RecommendationMismatchError(AutobatchError):
    """The Trainer is about to train with other numbers than the recommended ones."""


def training_arguments(recommendation: Any, **overrides: Any) -> transformers.TrainingArguments:
    """``TrainingArguments`` with the recommended batch, accumulation, learning rate and eval batch.

    ``recommendation``: a Recommendation, a ``TuneResult`` or a dict
    (:func:`~autobatch.integrations.load_recommendation`). ``overrides`` are any other
    ``TrainingArguments`` fields (``output_dir``, ``num_train_epochs``, ...); see the module's
    note for the ones that are refused.
    """
    rec = load_recommendation(recommendation)
    fields = rec.as_huggingface()
    for name in _TUNED:
        if name in overrides and not _same(overrides[name], fields[name]):
            raise InvalidParameterError(
                name,
                overrides[name],
                f"{fields[name]} as recommended, or left out ({rec.describe()}); to train otherwise, "
                "change the recommendation with dataclasses.replace",
            )
    if overrides.get("auto_find_batch_size"):
        raise InvalidParameterError(
            "auto_find_batch_size", True, f"False: {_EFFECTIVE_BATCH_NOTE} (transformers PR #33281)"
        )
    eval_batch = overrides.get("per_device_eval_batch_size")
    if eval_batch is not None and rec.eval_batch_size is not None:
        if eval_batch > rec.eval_batch_size:
            raise InvalidParameterError(
                "per_device_eval_batch_size",
                eval_batch,
                f"at most {rec.eval_batch_size}, the largest micro-batch the study evaluated within its memory budget",
            )
        fields["per_device_eval_batch_size"] = eval_batch
    return transformers.TrainingArguments(**{**overrides, **fields})


def apply_to_trainer(trainer: transformers.Trainer, recommendation: Any) -> dict[str, tuple[Any, Any]]:
    """Set a built ``Trainer`` to the recommendation before ``trainer.train()``; returns ``{field: (old, new)}``.

    Also adds an :class:`AutobatchTrainerCallback`, which checks the run when it begins.
    Refused: a Trainer that is training, that uses ``auto_find_batch_size`` or DeepSpeed (its
    config took the batch sizes at construction: build the arguments with
    :func:`training_arguments` instead), or that holds an optimizer at another learning rate.
    """
    rec = load_recommendation(recommendation)
    args = trainer.args
    if trainer.is_in_train:
        raise InvalidParameterError("trainer", "training", "a Trainer that is not training: apply before train()")
    if args.auto_find_batch_size:
        raise InvalidParameterError("trainer.args.auto_find_batch_size", True, f"False: {_EFFECTIVE_BATCH_NOTE}")
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise InvalidParameterError(
            "trainer", "DeepSpeed", "a Trainer without DeepSpeed; with it, build its args with training_arguments()"
        )
    if trainer.optimizer is not None:
        rates = _optimizer_rates(trainer.optimizer)
        if any(not _same(rate, rec.learning_rate) for rate in rates):
            raise InvalidParameterError(
                "trainer.optimizer",
                f"lr={rates}",
                f"an optimizer at the recommended lr={rec.learning_rate:.3g} (a given optimizer keeps its own rate), "
                "or none: the Trainer then creates it at args.learning_rate",
            )
    grad_acc = getattr(args.accelerator_config, "gradient_accumulation_kwargs", None) or {}
    if grad_acc.get("num_steps", rec.accumulation_steps) != rec.accumulation_steps:
        raise InvalidParameterError(
            "args.accelerator_config.gradient_accumulation_kwargs",
            grad_acc,
            f"no num_steps, or num_steps={rec.accumulation_steps} as recommended",
        )
    changes = {}
    for name, value in rec.as_huggingface().items():
        old = getattr(args, name)
        setattr(args, name, value)
        if old != value:
            changes[name] = (old, value)
    trainer._train_batch_size = args.train_batch_size  # Trainer's copy, which the train dataloader reads
    if not any(isinstance(callback, AutobatchTrainerCallback) for callback in trainer.callback_handler.callbacks):
        trainer.add_callback(AutobatchTrainerCallback(rec))
    logger.info("autobatch set the Trainer to %s: %s", rec.describe(), changes or "nothing to change")
    return changes


class AutobatchTrainerCallback(transformers.TrainerCallback):
    """Checks at ``on_train_begin`` that the Trainer trains at the recommendation, and logs it.

    Raises :class:`RecommendationMismatchError` naming what differs: the train dataloader's
    batch size, the accumulation steps, the optimizer's learning rate (before its schedule),
    or ``auto_find_batch_size`` left on.
    """

    def __init__(self, recommendation: Any):
        self.recommendation: Recommendation = load_recommendation(recommendation)

    def on_train_begin(self, args, state, control, **kwargs):
        rec = self.recommendation
        found = {
            "per_device_train_batch_size": _loader_batch_size(kwargs.get("train_dataloader")),
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            found["learning_rate"] = _optimizer_rates(optimizer)[0]
        expected = rec.as_huggingface()
        wrong = {
            name: value
            for name, value in found.items()
            if value is not None
            and not _same(value, expected[name] * (max(1, args.n_gpu) if name.endswith("size") else 1))
        }
        if args.auto_find_batch_size:
            wrong["auto_find_batch_size"] = True
        if wrong:
            raise RecommendationMismatchError(
                f"the Trainer is set to train with {wrong}, not the recommended {rec.describe()}; "
                "use autobatch.integrations.huggingface.apply_to_trainer, or training_arguments for its args"
            )
        logger.info("training at the recommended %s", rec.describe())


def _optimizer_rates(optimizer) -> list[float]:
    """The base learning rate of each parameter group (a scheduler keeps the first as ``initial_lr``)."""
    return [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]


def _loader_batch_size(loader) -> int | None:
    if loader is None:
        return None
    size = getattr(loader, "batch_size", None)
    if size is None and getattr(loader, "batch_sampler", None) is not None:
        size = getattr(loader.batch_sampler, "batch_size", None)
    return size


def _same(value: Any, recommended: Any) -> bool:
    if isinstance(recommended, float):
        return isinstance(value, (int, float)) and math.isclose(value, recommended, rel_tol=1e-6)
    return value == recommended
