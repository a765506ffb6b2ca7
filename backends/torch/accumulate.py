"""PyTorch gradient accumulation done right: one window of micro-batches, one optimizer step.

Each micro-batch's mean loss is weighted by its share of the window's samples, so the
summed gradients are the gradient of the window's mean loss even when the last
micro-batch is short. The optimizer, the scheduler and AMP's scaler step once per
window, and gradients are zeroed once per window. :class:`GradientNoiseMeter` records,
on the way, the gradient norms the noise-scale estimate needs; :class:`LearningRateScaler` sets
the rate a task's learning-rate schedule asks for before a window.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch.backends._trial import mean_loss_in_batches
from autobatch.backends.torch.data import MicroBatches, batch_samples, collate_for, fetch, to_device
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.training import BatchLoss, checked_loss

__all__ = ["GradientNoiseMeter", "LearningRateScaler", "evaluate", "train_window"]


def train_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: BatchLoss,
    micro_batches: Iterable[Any],
    *,
    precision: MixedPrecision | None = None,
    scheduler=None,
    noise_meter: GradientNoiseMeter | None = None,
    min_micro_batch: int = 1,
) -> float:
    """One optimizer step over a window of micro-batches; returns the window's mean loss.

    ``loss(model, batch)`` is a micro-batch's mean loss over its samples (for a
    ``(predictions, target)`` loss on ``(x, y)`` batches: ``supervised_loss(loss_fn)``). It is
    scaled by the micro-batch's share of the window's samples before ``backward``, so the
    accumulated gradient equals the full-window gradient. A ``noise_meter`` records the
    micro-batch and window gradient norms on the way. ``micro_batches`` is a sequence of
    batches (each one's samples counted from its first tensor), or a trial's
    :class:`~autobatch.backends.torch.data.MicroBatches`, which knows the sizes from the plan
    and fetches each micro-batch only when it is reached: so one micro-batch's data is held
    at a time, whatever the accumulation.

    A micro-batch of fewer than ``min_micro_batch`` samples is left out and the others are
    weighted over the samples kept (2 for a model with BatchNorm in training mode, which
    cannot normalise a single sample: PyTorch raises "Expected more than 1 value per
    channel"). Only a window's short last micro-batch can be that small; dropping its one
    sample changes the window's gradient by one sample of many, where the alternative is a
    crash. A window with nothing left takes no step and returns NaN.
    """
    precision = precision or MixedPrecision(torch.device("cpu"), enabled=False)
    if isinstance(micro_batches, MicroBatches):
        sizes: Sequence[int] = micro_batches.sizes
    else:
        micro_batches = list(micro_batches)
        sizes = [batch_samples(batch) for batch in micro_batches]
    total = sum(size for size in sizes if size >= min_micro_batch)
    if noise_meter is not None:
        noise_meter.start_window()
    # The losses: on the CPU each is read at once (nothing to wait for); on a GPU after the last
    # backward (a read per micro-batch would wait for each).
    losses: list[Any] = []
    try:
        for size, batch in zip(sizes, micro_batches, strict=True):
            if size < min_micro_batch:
                del batch  # fetched all the same: the next window's micro-batches follow it in the stream
                continue
            share = size / total
            with precision.autocast():
                weighted = checked_loss(loss(model, batch))
                if share != 1.0:  # a window of one micro-batch: no multiply, and no node for backward to run
                    weighted = weighted * share
            precision.backward(weighted)
            losses.append(weighted.item() if weighted.is_cpu else weighted.detach())
            del batch, weighted  # not held while the next micro-batch is fetched
            if noise_meter is not None:
                noise_meter.micro_batch_done(share)
    except BaseException:
        if noise_meter is not None:
            noise_meter.cancel_window()  # no hook measures the micro-batches of a window redone without it
        raise
    if noise_meter is not None:
        noise_meter.window_done(precision.loss_scale())
    if total == 0:
        return float("nan")
    precision.step(optimizer)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sum((float(weighted) for weighted in losses), 0.0)  # in float64, in order, as if read one by one


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss: BatchLoss,
    dataset: Any,
    batch_size: int,
    device: torch.device,
    *,
    collate_fn=None,
    precision: MixedPrecision | None = None,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
) -> float:
    """Mean loss over the validation samples (each sample weighs the same), in batches of ``batch_size``.

    ``indices``: the samples to evaluate, in order (all of ``dataset`` when ``None``); ``limit``:
    only the first that many of them. Each batch is collated by ``collate_fn`` as in training.
    """
    precision = precision or MixedPrecision(device, enabled=False)
    collate = collate_for(dataset, collate_fn)
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    model.eval()

    def loss_sum(start: int, stop: int) -> float:
        batch = to_device(fetch(dataset, order[start:stop], collate), device)
        with precision.autocast():
            return float(checked_loss(loss(model, batch)).double()) * (stop - start)

    try:
        return mean_loss_in_batches(len(order), batch_size, limit, loss_sum)
    finally:
        model.train()


class LearningRateScaler:
    """Sets each parameter group's learning rate to its starting one × a multiplier, so groups keep their ratios.

    The starting rates are read when it is made, before any checkpoint is loaded into the optimizer.
    A rate held as a tensor (a capturable or fused optimizer's) is filled in place: a compiled
    step keeps reading the same tensor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.base_rates = [float(group["lr"]) for group in optimizer.param_groups]

    def scale(self, multiplier: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_rates, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * multiplier)
            else:
                group["lr"] = base * multiplier


class GradientNoiseMeter:
    """The squared norms the noise-scale estimate needs (:mod:`autobatch.core.noise`), per window.

    A window's first micro-batch meets no gradient in ``.grad`` (the window before it ended with
    ``zero_grad(set_to_none=True)``): its gradient is ``.grad`` after its backward, whose norms
    are read in one call for all parameters. From the second micro-batch on, a hook on every
    parameter receives the gradient one backward pass adds before it is summed into ``.grad``,
    which is the micro-batch's own gradient: its norm costs one reduction per parameter, and no
    copy of the accumulated gradient. The window's norms are read from ``.grad`` before the
    optimizer step, again in one call. A window trained without the meter costs nothing: the
    hooks are only in place while a window is measured. Everything stays on the device until
    :meth:`window_norms`, so measuring adds no synchronisation. A window whose micro-batches differ
    in size (a short last one), or of one micro-batch, is left out: the estimate needs exactly two
    batch sizes. :attr:`seconds` is the time the meter took (what a
    :class:`~autobatch.core.noise.MeasuringBudget` weighs against training).

    Each hook writes its norm into a slot of a buffer made once (``out=``), and each micro-batch's
    slots are summed into a running total: a new tensor per parameter and micro-batch, held to the
    window's end, pinned the top of glibc's heap under the freed gradient blocks of the micro-batches
    that followed, so the heap grew with the accumulation (residual-mlp, micro-batch 2000 × 8: 70 MiB
    more than without the meter; with the slots, 4 MiB).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self._parameters = [p for p in parameters if p.requires_grad]
        # Parameters grouped by where and in which type their norms are reduced (a half-precision
        # gradient's in float32): one slot buffer and one running total per group.
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, parameter in enumerate(self._parameters):
            groups.setdefault((parameter.device, _norm_dtype(parameter.dtype)), []).append(index)
        self._groups = list(groups.values())
        self._buffers = [torch.zeros(len(members), device=d, dtype=t) for (d, t), members in groups.items()]
        self._totals = [torch.zeros((), device=d, dtype=t) for d, t in groups]
        self._slots: list[torch.Tensor] = [torch.empty(0)] * len(self._parameters)  # each parameter's norm slot
        for buffer, members in zip(self._buffers, self._groups, strict=True):
            for position, index in enumerate(members):
                self._slots[index] = buffer[position]
        self._handles: list[Any] = []
        self._first_from_grad = False
        self._counted_micro_batches = 0
        self.seconds = 0.0
        self._shares: list[float] = []
        self._windows: list[torch.Tensor] = []  # per window: (Σ micro-batch |grad|², |window grad|²), as summed
        self._factors: list[tuple[float, float]] = []  # per window: what turns those into mean-loss gradients

    def start_window(self) -> None:
        """Before the window's first backward."""
        started = time.perf_counter()
        self._shares, self._counted_micro_batches = [], 0
        for total in self._totals:
            total.zero_()
        # Gradients left in .grad (a loop that zeroes them to 0, not None) would be summed into the first's.
        self._first_from_grad = all(p.grad is None for p in self._parameters)
        if not self._first_from_grad:
            self._add_hooks()
        self.seconds += time.perf_counter() - started

    def micro_batch_done(self, share: float) -> None:
        """After a micro-batch's backward: its loss was its mean loss × ``share`` (× the loss scale)."""
        started = time.perf_counter()
        self._shares.append(share)
        if self._first_from_grad and len(self._shares) == 1:
            self._read_grads_into_slots()
            self._add_hooks()
        self._add_slots_to_totals()
        self.seconds += time.perf_counter() - started

    def window_done(self, loss_scale: float) -> None:
        """Before the optimizer step, while ``.grad`` holds the window's gradient (× ``loss_scale``)."""
        started = time.perf_counter()
        self.cancel_window()
        shares = self._shares
        # One micro-batch (a sample budget below the window) gives no second batch size.
        if self._counted_micro_batches and len(shares) > 1 and len(set(shares)) == 1:
            micro = self._total(self._totals)
            if self._read_grads_into_slots():
                window = self._total([torch.dot(buffer, buffer) for buffer in self._buffers])
                # One tensor kept per window: a few dozen small ones would keep Python's collector busy.
                self._windows.append(torch.stack([micro, window]))
                # Each micro-batch gradient carried share × scale, the window's gradient the scale alone.
                self._factors.append((1.0 / (len(shares) * (shares[0] * loss_scale) ** 2), 1.0 / loss_scale**2))
            for buffer in self._buffers:
                buffer.zero_()
        self.seconds += time.perf_counter() - started

    def cancel_window(self) -> None:
        """Stop measuring the window (at its end, or when it failed): the hooks come off."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        # A removed hook leaves its (now empty) dict behind, and autograd calls into Python for it on every
        # backward, about a microsecond per parameter (measured on torch 2.13): a small model's windows
        # would then all run ~1.5 % slower after the first measured one. Without a hook left, the slot is
        # cleared (as it was before the first hook), which drops that call.
        for parameter in self._parameters:
            if parameter._backward_hooks is not None and not parameter._backward_hooks:
                parameter._backward_hooks = None

    def window_norms(self) -> list[tuple[float, float]]:
        """(mean squared norm of the micro-batch gradients, squared norm of the window's) per measured window."""
        if not self._windows:
            return []
        norms = torch.stack(self._windows).double().cpu().tolist()
        return [(micro * a, window * b) for (micro, window), (a, b) in zip(norms, self._factors, strict=True)]

    def close(self) -> None:
        self.cancel_window()

    def _read_grads_into_slots(self) -> bool:
        """Each parameter's ``.grad`` norm into its slot (one call per group); False where none has a gradient."""
        found = False
        for members in self._groups:
            held = [(self._slots[i], self._parameters[i].grad) for i in members if self._parameters[i].grad is not None]
            if not held:
                continue
            found = True
            for slot, norm in zip((s for s, _ in held), _norms([g for _, g in held]), strict=True):
                slot.copy_(norm)
        return found

    def _add_slots_to_totals(self) -> None:
        """This micro-batch's squared norm (the sum of its slots' squares) into the totals; the slots cleared
        (a parameter the next micro-batch leaves without a gradient must add nothing)."""
        for buffer, total in zip(self._buffers, self._totals, strict=True):
            total.add_(torch.dot(buffer, buffer))
            buffer.zero_()
        self._counted_micro_batches += 1

    @staticmethod
    def _total(per_group: list[torch.Tensor]) -> torch.Tensor:
        if len(per_group) == 1:
            return per_group[0].clone()
        device = per_group[0].device
        return torch.stack([value.to(device, torch.float64) for value in per_group]).sum()

    def _add_hooks(self) -> None:
        if self._handles:
            return

        def recorder(slot: torch.Tensor, dtype: torch.dtype | None):
            def record(grad: torch.Tensor) -> None:  # runs once per parameter and micro-batch: one reduction
                started = time.perf_counter()
                torch.linalg.vector_norm(grad, dtype=dtype, out=slot)
                self.seconds += time.perf_counter() - started

            return record

        self._handles = [
            p.register_hook(recorder(slot, torch.float32 if p.dtype in _HALF_TYPES else None))
            for p, slot in zip(self._parameters, self._slots, strict=True)
        ]


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type a gradient's norm is reduced in: float32 for a half-precision one (whose norm overflows past 65504)."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's 2-norm, in one call where none is half precision (``_foreach_norm``, as
    ``clip_grad_norm_`` reads them), else one by one in float32."""
    if any(tensor.dtype in _HALF_TYPES for tensor in tensors):
        return [_norm(tensor) for tensor in tensors]
    return list(torch._foreach_norm(tensors))


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm, reduced in at least float32 (a float16 norm overflows past 65504)."""
    if tensor.dtype in _HALF_TYPES:
        return torch.linalg.vector_norm(tensor, dtype=torch.float32)
    return torch.linalg.vector_norm(tensor)


_HALF_TYPES = (torch.float16, torch.bfloat16)
