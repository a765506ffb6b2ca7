"""Adaptive micro-batching in your own PyTorch loop (the controller is :mod:`autobatch.core.adaptive`)."""

from __future__ import annotations

import torch
from torch import nn

from autobatch.backends.torch.memory import ONEDNN_POISONED, is_oom, release_cached_memory, unrecoverable
from autobatch.backends.torch.precision import MixedPrecision
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
    mode) compute over micro-batches, as with any gradient accumulation.

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
        loss_fn,
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
        self.scheduler = scheduler
        self.device = torch.device(device) if device is not None else None
        self.precision = precision or MixedPrecision(self.device or torch.device("cpu"), enabled=False)

    def step(self, x, y, *, epoch: int | None = None) -> float:
        """One optimizer step over the window ``(x, y)``; returns the window's mean loss."""
        window_size = len(y)
        buffers = [buffer for buffer in self.model.buffers()]
        saved = [buffer.detach().clone() for buffer in buffers]
        window_loss = [0.0]
        self._zero_grad()

        def accumulate(start: int, stop: int, share: float) -> None:
            xb, yb = _slice_batch(x, start, stop, self.device), _slice_batch(y, start, stop, self.device)
            try:
                with self.precision.autocast():
                    loss = self.loss_fn(_call(self.model, xb), yb) * share
                self.precision.backward(loss)
            except RuntimeError as error:
                if ONEDNN_POISONED in str(error):
                    raise unrecoverable(error) from None  # the frames go with the error: memory is freed
                raise
            window_loss[0] += float(loss.detach())

        def apply() -> float:
            self.precision.step(self.optimizer)
            if self.scheduler is not None:
                self.scheduler.step()
            self._zero_grad()
            return window_loss[0]

        def release() -> None:
            self._zero_grad()
            window_loss[0] = 0.0
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)
            release_cached_memory()  # give the failed step's cached blocks back before the redo

        return self.controller.run_window(window_size, accumulate, apply, is_oom=is_oom, release=release, epoch=epoch)

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


def _call(model: nn.Module, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)
