"""Adaptive micro-batching in your own PyTorch loop (the controller is :mod:`autobatch.core.adaptive`)."""

from __future__ import annotations

import torch
from torch import nn

from autobatch.backends.torch.memory import ONEDNN_POISONED, is_oom, release_cached_memory, unrecoverable
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.training import (
    BatchLoss,
    checked_loss,
    default_loss,
    has_batch_norm,
    require_batch_norm_micro_batch,
    supervised_loss,
)
from autobatch.core.adaptive import AdaptiveStepper

__all__ = ["AdaptiveMicroBatcher"]


class AdaptiveMicroBatcher(AdaptiveStepper):
    """Adaptive micro-batching in your own PyTorch loop: one :meth:`step` per window (optimizer step).

    ::

        batcher = AdaptiveMicroBatcher(model, optimizer, nn.functional.cross_entropy, micro_batch_size=256)
        for x, y in loader:  # each batch is one window: the effective batch
            loss = batcher.step(x, y)
        print(batcher.adaptations)

    The window is cut into micro-batches of the current size, each loss weighted by its
    share of the window, one optimizer step. When a micro-batch runs out of memory, the
    partial gradients are dropped, the model's buffers (BatchNorm statistics, counters)
    are put back as they were before the window, memory is freed, and the window is
    redone at half the micro-batch: same samples, same order, same effective batch and
    learning rate. After ``grow_after`` clean windows the size doubles again, never past
    ``max_micro_batch`` (default: the starting size). An OOM in the optimizer step
    raises :class:`autobatch.core.adaptive.OptimizerStepOOMError`. ``x`` may be a tensor, or a
    tuple/list/dict of tensors sliced alike; with ``device`` each micro-batch is moved
    there as it is used, so the window itself can stay in (pinned) host memory.
    Layers whose output depends on the micro-batch as a whole (BatchNorm in training
    mode) compute over micro-batches, as with any gradient accumulation; such a model
    needs micro-batches of at least 2 samples (a smaller size is refused, halving stops
    at 2, and a last micro-batch of one sample is left out of its window).

    ``loss_fn`` is a ``(predictions, target)`` loss for :meth:`step`'s ``(x, y)``; or give
    ``batch_loss``, a ``(model, batch) -> mean loss`` as a :class:`~autobatch.TorchTask`
    takes it (neither: the task default, ``model(**batch).loss`` or cross-entropy).
    :meth:`step_indices` trains a window of dataset indices, fetching each micro-batch
    on its own: ``autobatch train`` uses it.

    On the CPU, oneDNN can fail to create a kernel ("could not create a primitive") when
    memory runs out, and after that every convolution in the process fails, at any size,
    with memory to spare (measured: 380 MB used of a 1 GiB cap, a micro-batch of 1 still
    refused). Redoing the window here is futile, so that error is raised as
    :class:`autobatch.core.adaptive.UnrecoverableOOMError`; ``autobatch train`` redoes the
    window in a new process from its last checkpoint. Ordinary allocation failures are
    redone in this process.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn=None,
        *,
        micro_batch_size: int | None = None,
        max_micro_batch: int | None = None,
        min_micro_batch: int = 1,
        grow_after: int | None = None,
        adaptive: bool = True,
        precision: MixedPrecision | None = None,
        scheduler=None,
        device: str | torch.device | None = None,
        on_adaptation=None,
        controller=None,
        batch_loss: BatchLoss | None = None,
    ):
        self._take_controller(
            controller,
            micro_batch_size,
            max_micro_batch=max_micro_batch,
            min_micro_batch=min_micro_batch,
            grow_after=grow_after,
            adaptive=adaptive,
            on_adaptation=on_adaptation,
        )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        if batch_loss is None:
            batch_loss = supervised_loss(loss_fn) if loss_fn is not None else default_loss
        #: ``(model, batch) -> mean loss``: what each micro-batch is trained on
        self.batch_loss = batch_loss
        self.scheduler = scheduler
        self.device = torch.device(device) if device is not None else None
        self.precision = precision or MixedPrecision(self.device or torch.device("cpu"), enabled=False)
        #: micro-batches of fewer samples are left out (see :func:`~autobatch.backends.torch.accumulate.train_window`)
        self.min_samples = 1
        if has_batch_norm(model):
            require_batch_norm_micro_batch(self.controller.micro_batch_size)
            # Halving after an OOM must stop at 2: a BatchNorm layer cannot train on one sample.
            self.controller.min_micro_batch = max(self.controller.min_micro_batch, 2)
            self.min_samples = 2

    def step(self, x, y, *, epoch: int | None = None) -> float:
        """One optimizer step over the window ``(x, y)``; returns the window's mean loss.

        Each micro-batch is ``(x[start:stop], y[start:stop])`` (a dict or tuple ``x`` sliced alike).
        """

        def micro_batch(start: int, stop: int):
            return _slice_batch(x, start, stop, self.device), _slice_batch(y, start, stop, self.device)

        return self._run(len(y), micro_batch, epoch)

    def step_indices(self, indices, fetch, *, epoch: int | None = None) -> float:
        """One optimizer step over the window of samples ``indices``; returns the window's mean loss.

        ``fetch(indices)`` returns the collated batch of those samples on the device. Each
        micro-batch is fetched on its own, at its turn, also when a window is redone at a
        smaller size: so a padding collator pads each micro-batch to its own longest sample,
        and one micro-batch's data is held at a time.
        """
        return self._run(len(indices), lambda start, stop: fetch(indices[start:stop]), epoch)

    def _run(self, window_size: int, micro_batch, epoch: int | None) -> float:
        buffers = [buffer for buffer in self.model.buffers()]
        saved = [buffer.detach().clone() for buffer in buffers]
        window_loss = [0.0]
        trained = [0]  # samples trained in this attempt
        self._zero_grad()

        def accumulate(start: int, stop: int, share: float) -> None:
            kept = self._kept_samples(window_size)
            if stop - start < self.min_samples:
                return  # a last micro-batch of one sample in a BatchNorm model: left out, the rest reweighted
            batch = micro_batch(start, stop)
            try:
                with self.precision.autocast():
                    loss = checked_loss(self.batch_loss(self.model, batch)) * ((stop - start) / kept)
                self.precision.backward(loss)
            except RuntimeError as error:
                if ONEDNN_POISONED in str(error):
                    raise unrecoverable(error) from None  # the frames go with the error: memory is freed
                raise
            window_loss[0] += float(loss.detach())
            trained[0] += stop - start

        def apply() -> float:
            if trained[0] == 0:  # a window of one sample in a BatchNorm model: nothing to step on
                return float("nan")
            self.precision.step(self.optimizer)
            if self.scheduler is not None:
                self.scheduler.step()
            self._zero_grad()
            return window_loss[0]

        def release() -> None:
            self._zero_grad()
            window_loss[0] = 0.0
            trained[0] = 0
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)
            release_cached_memory()  # give the failed step's cached blocks back before the redo

        return self.controller.run_window(window_size, accumulate, apply, is_oom=is_oom, release=release, epoch=epoch)

    def _kept_samples(self, window_size: int) -> int:
        """The window's samples less a last micro-batch too small to train on, at the current size."""
        short = window_size % self.controller.micro_batch_size
        return window_size - short if 0 < short < self.min_samples else window_size

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)


def _slice_batch(batch, start: int, stop: int, device: torch.device | None):
    if isinstance(batch, dict):
        return {key: _slice_batch(value, start, stop, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_batch(value, start, stop, device) for value in batch)
    part = batch[start:stop]
    if device is not None and isinstance(part, torch.Tensor) and part.device != device:
        part = part.to(device, non_blocking=part.is_pinned())
    return part
