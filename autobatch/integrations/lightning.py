"""A tuned config in a Lightning run: the batch size, ``accumulate_grad_batches`` and the learning rate.

``Trainer(callbacks=[AutobatchCallback(study_name="s", storage="sqlite:///autobatch.db")])``
applies a study's recommendation when ``fit`` starts; :func:`apply_recommendation` does the same
to a Trainer and module already built. Lightning's own batch-size finder sets the batch size
alone (Lightning #17393) and ran trials that left state behind (#18394); this sets all three
numbers, runs nothing, and adds nothing to the module or the Trainer beyond the values it sets.

Importing ``autobatch`` never imports this module: it is the ``autobatch[lightning]`` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from autobatch.errors import AutobatchError, InvalidParameterError
from autobatch.integrations._recommendation import Recommendation, load_recommendation

__all__ = ["AutobatchCallback", "apply_recommendation"]

log = logging.getLogger(__name__)


def apply_recommendation(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    recommendation: Any,
    *,
    datamodule: pl.LightningDataModule | None = None,
    batch_arg_name: str = "batch_size",
    lr_attr_name: str | None = "lr",
) -> dict:
    """Set a recommendation on a Trainer and module before ``fit``; returns what was set.

    ``recommendation`` is anything :func:`~autobatch.integrations.load_recommendation` takes (a
    TuneResult, a Recommendation, a dict). The batch size goes to every holder of
    ``batch_arg_name`` Lightning's tuner would set: the module, the DataModule (``datamodule``, or
    the one the Trainer holds) and their ``hparams``; the Trainer gets ``accumulate_grad_batches``;
    the module (or its ``hparams``) gets ``lr_attr_name``, which ``configure_optimizers`` must
    read. ``lr_attr_name=None`` leaves the learning rate alone, though it was tuned with the
    batch. Nothing is set unless everything can be.
    """
    recommendation = load_recommendation(recommendation)
    datamodule = datamodule if datamodule is not None else _attached_datamodule(trainer)
    return _apply(trainer, model, datamodule, recommendation, batch_arg_name, lr_attr_name)


class AutobatchCallback(pl.Callback):
    """Apply a recommendation at the start of ``fit``.

    ``AutobatchCallback(result)`` with a TuneResult, Recommendation or dict, or
    ``AutobatchCallback(study_name="s", storage="sqlite:///autobatch.db")`` for a stored study
    (read here, so a missing study fails before the Trainer starts).

    The values are set in ``setup``: after the Trainer attached the DataModule and before
    ``configure_optimizers`` runs and the train DataLoader is built, so the optimizer is
    created at the recommended rate and ``train_dataloader()`` reads the recommended batch size.
    (Lightning's finder runs in ``on_fit_start``, after the optimizer exists: it can only change
    the batch size.) At ``on_train_start`` the loader the Trainer built is checked: a loader that
    does not batch the recommended micro-batch is an error, since the effective batch would not
    be micro × accumulation. ``validate``, ``test`` and ``predict`` are left alone.
    """

    def __init__(
        self,
        recommendation: Any = None,
        *,
        study_name: str | None = None,
        storage: str | None = None,
        batch_arg_name: str = "batch_size",
        lr_attr_name: str | None = "lr",
    ):
        self.recommendation: Recommendation = load_recommendation(
            recommendation, storage=storage, study_name=study_name
        )
        self.batch_arg_name = batch_arg_name
        self.lr_attr_name = lr_attr_name
        #: what the last ``fit`` was given, as :func:`apply_recommendation` returns it
        self.applied: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.applied = _apply(
            trainer,
            pl_module,
            _attached_datamodule(trainer),
            self.recommendation,
            self.batch_arg_name,
            self.lr_attr_name,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recommendation = self.recommendation
        batched = _loader_batch_size(trainer.train_dataloader)
        if batched is not None and batched != recommendation.micro_batch_size:
            raise AutobatchError(
                f"the train DataLoader batches {batched} samples, not the recommended micro-batch "
                f"{recommendation.micro_batch_size}: build it in train_dataloader() with "
                f"batch_size=self.{self.batch_arg_name}"
            )
        if self.lr_attr_name is not None:
            _warn_about_other_rates(trainer, recommendation.learning_rate, self.lr_attr_name)


# --- helpers ----------------------------------------------------------------------------------------


def _apply(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    recommendation: Recommendation,
    batch_arg_name: str,
    lr_attr_name: str | None,
) -> dict:
    accumulation = recommendation.accumulation_steps
    if accumulation > 1 and not model.automatic_optimization:
        raise InvalidParameterError(
            "accumulation_steps",
            accumulation,
            "1 for a LightningModule with automatic_optimization=False: Lightning accumulates only under "
            "automatic optimization",
        )
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by the Trainer's callback connector
    if any(isinstance(callback, GradientAccumulationScheduler) for callback in callbacks):
        raise InvalidParameterError(
            "trainer",
            "GradientAccumulationScheduler",
            "a Trainer without a GradientAccumulationScheduler: it resets accumulate_grad_batches every epoch",
        )
    owners = [("DataModule", datamodule), ("LightningModule", model)]
    batch_holders = _holders(owners, batch_arg_name)
    lr_holders = _holders(owners[1:], lr_attr_name) if lr_attr_name is not None else []
    # Look everything up before setting anything: an error leaves the run as it was.
    if not batch_holders:
        raise InvalidParameterError("batch_arg_name", batch_arg_name, _missing(owners, "the batch size"))
    if lr_attr_name is not None and not lr_holders:
        raise InvalidParameterError("lr_attr_name", lr_attr_name, _missing(owners[1:], "the learning rate"))

    applied: dict[str, Any] = {batch_arg_name: recommendation.micro_batch_size}
    where = [_set(holders, batch_arg_name, recommendation.micro_batch_size) for holders in batch_holders]
    applied["accumulate_grad_batches"] = accumulation
    trainer.accumulate_grad_batches = accumulation
    where.append(f"Trainer.accumulate_grad_batches={accumulation}")
    if lr_attr_name is not None:
        applied[lr_attr_name] = recommendation.learning_rate
        where += [_set(holders, lr_attr_name, recommendation.learning_rate) for holders in lr_holders]
    if trainer.is_global_zero:
        log.info("autobatch: %s; set %s", _summary(recommendation, trainer.world_size), ", ".join(where))
    return applied


def _attached_datamodule(trainer: pl.Trainer) -> pl.LightningDataModule | None:
    # The Trainer sets ``datamodule`` in its data connector, where type checkers do not see it.
    return getattr(trainer, "datamodule", None)


def _holders(owners: list[tuple[str, Any]], name: str) -> list[tuple[str, Any]]:
    """Where ``name`` lives, as Lightning's ``lightning_setattr`` looks: each owner and its ``hparams``.

    Written here rather than calling ``lightning_setattr`` because that one finds the DataModule
    only through ``model.trainer``, which a Trainer attaches inside ``fit``, not before.
    """
    found = []
    for label, owner in owners:
        if owner is None:
            continue
        if hasattr(owner, name):
            found.append((label, owner))
        # Reading the ``hparams`` property creates an empty ``_hparams`` where there is none, which
        # would leave an attribute behind (as Lightning's own lookup does): read it only where it exists.
        hparams = owner.hparams if "_hparams" in vars(owner) else None
        if isinstance(hparams, Mapping) and name in hparams:
            found.append((f"{label}.hparams", hparams))
    return found


def _set(holder: tuple[str, Any], name: str, value: Any) -> str:
    label, owner = holder
    if isinstance(owner, MutableMapping):
        owner[name] = value
    else:
        setattr(owner, name, value)
    return f"{label}.{name}={value:g}" if isinstance(value, float) else f"{label}.{name}={value}"


def _missing(owners: list[tuple[str, Any]], what: str) -> str:
    looked = " or ".join(f"{label} (or its hparams)" for label, owner in owners if owner is not None)
    return f"the name of the attribute that holds {what}; no {looked} has it"


def _summary(recommendation: Recommendation, world_size: int) -> str:
    text = recommendation.describe()
    if world_size > 1:
        # The study measured one device's memory: the micro-batch is per device, the global batch grows.
        text += (
            f"; per device: across {world_size} processes the effective batch is "
            f"{recommendation.effective_batch_size * world_size}"
        )
    return text


def _loader_batch_size(loader: Any) -> int | None:
    """The batch size of a single train DataLoader, or None where it cannot be told (several, custom sampler)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) else None


def _warn_about_other_rates(trainer: pl.Trainer, learning_rate: float, lr_attr_name: str) -> None:
    # A scheduler may start below the base rate (warm-up); it keeps the base as "initial_lr".
    rates = {
        group.get("initial_lr", group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups
    }
    if rates and learning_rate not in rates:
        log.warning(
            "autobatch: the optimizer's learning rate is %s, not the recommended %g: does configure_optimizers() "
            "read self.%s?",
            ", ".join(f"{rate:g}" for rate in sorted(rates)),
            learning_rate,
            lr_attr_name,
        )
