"""PyTorch backend: gradient accumulation done right, behind the common trial interface.

Each micro-batch's mean loss is weighted by its share of the window's samples, so
the summed gradients are the gradient of the window's mean loss even when the last
micro-batch is short. The optimizer, the scheduler and AMP's scaler step once per
window, and gradients are zeroed once per window.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import numpy as np
import torch
import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (~1 s); forked trials inherit it
from torch import nn
from torch.utils.data import DataLoader

from autobatch.core.adaptive import AdaptiveStepper
from autobatch.backends.base import Backend, TrialMeasurements, TrialProgress
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.noise import NoiseScaleEstimator
from autobatch.core.schedule import TrialSchedule, run_schedule, trial_extras
from autobatch.core.windows import SteadyStateTimer, Window
from autobatch.tasks.workload import Workload

# What an allocation failure under RLIMIT_DATA looks like on the CPU: the default
# allocator's own message, or oneDNN failing to build a kernel it had no memory for.
_CPU_OOM_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "could not create a primitive")


class TorchBackend(Backend):
    name = "torch"

    def default_device(self) -> str:
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def fork_safe(self, device: str) -> bool:
        # Importing torch starts no thread pool and does not initialise CUDA, so a forked
        # process starts clean; the cap is applied in each of them.
        return True

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        if not device.startswith("cuda"):
            return
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), index)

    def is_oom(self, error: BaseException) -> bool:
        if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
            return True
        text = str(error)
        return isinstance(error, RuntimeError) and ("out of memory" in text or any(t in text for t in _CPU_OOM_TEXTS))

    def peak_memory_bytes(self, device: str) -> int | None:
        # The cap limits what the caching allocator reserves, so the reserved peak is what
        # is compared with the budget.
        return int(torch.cuda.max_memory_reserved(device)) if device.startswith("cuda") else None

    def current_memory_bytes(self, device: str) -> int | None:
        return int(torch.cuda.memory_reserved(device)) if device.startswith("cuda") else None

    def reset_peak_memory(self, device: str) -> None:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

    def run_trial(
        self, workload: Workload, config: TrialConfig, budget: TrialBudget, device: str, progress: TrialProgress
    ) -> TrialMeasurements:
        torch_device = torch.device(device)
        on_cuda = torch_device.type == "cuda"
        torch.manual_seed(budget.seed)
        model = workload.build_model("torch").to(torch_device)
        model.train()
        optimizer = make_optimizer(workload.optimizer, model.parameters(), config.learning_rate)
        loss_fn = make_loss(workload.loss)
        precision = MixedPrecision(torch_device, enabled=budget.mixed_precision)

        train_set = ArrayDataset(workload.x_train, workload.y_train)
        schedule = TrialSchedule(len(train_set), config.micro_batch_size, config.accumulation_steps, budget)
        # The noise scale needs two batch sizes, a micro-batch's and its window's: only with accumulation.
        meter = GradientNoiseMeter(model.parameters()) if budget.measure_noise and config.accumulation_steps > 1 else None
        if on_cuda:
            torch.cuda.synchronize(torch_device)
        progress.mark_baseline()

        def feed(chunks):
            return _device_batches(train_set, chunks, budget, torch_device)

        def train(window: Window, micro_batches, measure: bool) -> float:
            measured = meter if measure else None
            loss = train_window(model, optimizer, loss_fn, micro_batches, precision=precision, noise_meter=measured)
            if on_cuda:
                torch.cuda.synchronize(torch_device)
            return loss

        eval_batch = budget.eval_batch_size or config.micro_batch_size

        def validate() -> float:
            return evaluate(
                model, loss_fn, workload.x_val, workload.y_val, eval_batch, torch_device, precision, budget.val_samples
            )

        timer = SteadyStateTimer(budget.warmup_steps)
        outcome = run_schedule(schedule, feed=feed, train=train, evaluate=validate, progress=progress, timer=timer)
        estimator = NoiseScaleEstimator()
        if meter is not None:
            meter.close()
            for micro_sq_norm, window_sq_norm in meter.window_norms():
                estimator.add_window(
                    config.micro_batch_size, config.effective_batch_size, micro_sq_norm, window_sq_norm
                )
        return TrialMeasurements(
            samples_per_second=timer.samples_per_second,
            val_loss=outcome.val_loss,
            samples_trained=outcome.samples_trained,
            steps_timed=timer.timed_windows,
            timings={"train": outcome.train_seconds, "eval": outcome.eval_seconds},
            extras={"final_train_loss": outcome.last_train_loss, **trial_extras(outcome, estimator)},
        )


def _device_batches(dataset: "ArrayDataset", chunks, budget: TrialBudget, device: torch.device):
    """Each window with its micro-batches on ``device``; one DataLoader (the window plan as its batch sampler) per chunk."""
    on_cuda = device.type == "cuda"
    for windows in chunks:
        loader = DataLoader(
            dataset,
            batch_sampler=[mb for window in windows for mb in window.micro_batches],
            collate_fn=_keep_batch,
            num_workers=budget.num_workers,
            pin_memory=on_cuda,
        )
        batches = iter(loader)
        for window in windows:
            yield window, [
                (x.to(device, non_blocking=on_cuda), y.to(device, non_blocking=on_cuda))
                for x, y in (next(batches) for _ in window.micro_batches)
            ]


class GradientNoiseMeter:
    """The squared norms the noise-scale estimate needs (:mod:`autobatch.core.noise`), per window.

    A hook on every parameter receives the gradient one backward pass adds before it is
    summed into ``.grad``, which is the micro-batch's own gradient: its norm costs one
    reduction per parameter, and no copy of the accumulated gradient. The window's norm
    is read from ``.grad`` before the optimizer step. Everything stays on the device
    until :meth:`window_norms`, so measuring adds no synchronisation. A window whose
    micro-batches differ in size (a short last one) is left out: the estimate needs
    exactly two batch sizes.
    """

    def __init__(self, parameters):
        self._parameters = [p for p in parameters if p.requires_grad]
        self._handles = [p.register_hook(self._record) for p in self._parameters]
        self._active = False
        self._norms: list[torch.Tensor] = []  # this window's parameter-gradient norms, all its micro-batches
        self._shares: list[float] = []
        self._windows: list[torch.Tensor] = []  # per window: (Σ micro-batch |grad|², |window grad|²), as summed
        self._factors: list[tuple[float, float]] = []  # per window: what turns those into mean-loss gradients

    def start_window(self) -> None:
        self._active = True
        self._norms, self._shares = [], []

    def micro_batch_done(self, share: float) -> None:
        """After a micro-batch's backward: its loss was its mean loss × ``share`` (× the loss scale)."""
        self._shares.append(share)

    def window_done(self, loss_scale: float) -> None:
        """Before the optimizer step, while ``.grad`` holds the window's gradient (× ``loss_scale``)."""
        self._active = False
        grads = [p.grad for p in self._parameters if p.grad is not None]
        if not grads or not self._norms or len(set(self._shares)) != 1:
            return
        micro = torch.linalg.vector_norm(torch.stack(self._norms))
        window = torch.linalg.vector_norm(torch.stack([_norm(g) for g in grads]))
        self._windows.append(torch.stack([micro, window]))
        # Each micro-batch gradient carried share × scale, the window's gradient the scale alone.
        share = self._shares[0]
        self._factors.append((1.0 / (len(self._shares) * (share * loss_scale) ** 2), 1.0 / loss_scale**2))

    def window_norms(self) -> list[tuple[float, float]]:
        """(mean squared norm of the micro-batch gradients, squared norm of the window's) per measured window."""
        if not self._windows:
            return []
        norms = torch.stack(self._windows).double().cpu().tolist()
        return [(micro**2 * a, window**2 * b) for (micro, window), (a, b) in zip(norms, self._factors)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, grad: torch.Tensor) -> None:
        if self._active:  # runs once per parameter and micro-batch: kept to one reduction
            self._norms.append(_norm(grad))


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm, reduced in at least float32 (a float16 norm overflows past 65504)."""
    if tensor.dtype in _HALF_TYPES:
        return torch.linalg.vector_norm(tensor, dtype=torch.float32)
    return torch.linalg.vector_norm(tensor)


_HALF_TYPES = (torch.float16, torch.bfloat16)


def train_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    precision: "MixedPrecision | None" = None,
    scheduler=None,
    noise_meter: "GradientNoiseMeter | None" = None,
) -> float:
    """One optimizer step over a window of micro-batches; returns the window's mean loss.

    Each micro-batch's mean loss is scaled by its share of the window's samples
    before ``backward``, so the accumulated gradient equals the full-window gradient.
    A ``noise_meter`` records the micro-batch and window gradient norms on the way.
    """
    precision = precision or MixedPrecision(torch.device("cpu"), enabled=False)
    total = sum(len(y) for _, y in micro_batches)
    window_loss = 0.0
    if noise_meter is not None:
        noise_meter.start_window()
    for x, y in micro_batches:
        share = len(y) / total
        with precision.autocast():
            loss = loss_fn(model(x), y) * share
        precision.backward(loss)
        window_loss += float(loss.detach())
        if noise_meter is not None:
            noise_meter.micro_batch_done(share)
    if noise_meter is not None:
        noise_meter.window_done(precision.loss_scale())
    precision.step(optimizer)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return window_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    device: torch.device,
    precision: "MixedPrecision | None" = None,
    limit: int | None = None,
) -> float:
    """Mean loss over the validation samples (each sample weighs the same)."""
    precision = precision or MixedPrecision(device, enabled=False)
    model.eval()
    count = len(y) if limit is None else min(limit, len(y))
    total = 0.0
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        xb = torch.from_numpy(x[start:stop]).to(device)
        yb = torch.from_numpy(y[start:stop]).to(device)
        with precision.autocast():
            total += float(loss_fn(model(xb), yb).double()) * (stop - start)
    model.train()
    return total / count


class MixedPrecision:
    """Autocast and, on CUDA, a GradScaler that steps once per window."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if enabled and device.type == "cuda" else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def loss_scale(self) -> float:
        """The factor gradients carry until the step unscales them (1 without a scaler)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # unscales once, skips the step on inf/NaN
        self.scaler.update()


class ArrayDataset(torch.utils.data.Dataset):
    """numpy arrays as a map-style dataset that fetches a whole micro-batch at once."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Iterable[int]):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.x[index], self.y[index]


def _keep_batch(batch):
    return batch


def make_optimizer(name: str, parameters, learning_rate: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)
    raise ValueError(f"optimizer={name!r} is not supported by the torch backend")


def make_loss(name: str):
    if name == "cross_entropy":
        return nn.functional.cross_entropy
    if name == "mse":
        return lambda prediction, target: nn.functional.mse_loss(prediction.reshape(target.shape), target)
    raise ValueError(f"loss={name!r} is not supported by the torch backend")


__all__ = ["TorchBackend", "train_window", "evaluate", "MixedPrecision", "ArrayDataset", "GradientNoiseMeter"]


# -- Adaptive micro-batching (autobatch.core.adaptive) ---------------------------------------------------


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
        precision: "MixedPrecision | None" = None,
        scheduler=None,
        device: "str | torch.device | None" = None,
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
        self._is_oom = TorchBackend().is_oom

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
                if _ONEDNN_POISONED in str(error):
                    raise _unrecoverable(error) from None  # the frames go with the error: memory is freed
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
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
            import gc

            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # give the failed step's cached blocks back before the redo

        return self.controller.run_window(
            window_size, accumulate, apply, is_oom=self._is_oom, release=release, epoch=epoch
        )

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)


# oneDNN's words when it could not build a kernel for want of memory; the process cannot
# run that kind of kernel again (see AdaptiveMicroBatcher).
_ONEDNN_POISONED = "could not create a primitive"


def _unrecoverable(error: BaseException):
    from autobatch.core.adaptive import UnrecoverableOOMError, first_line

    detail = first_line(error)
    return UnrecoverableOOMError(
        f"PyTorch ran out of memory in oneDNN ({detail}); after that oneDNN refuses every kernel in this "
        "process, whatever the size: start a new process with a smaller micro-batch (autobatch train does "
        "this itself, from its last checkpoint)",
        detail=detail,
    )


def _slice_batch(batch, start: int, stop: int, device: "torch.device | None"):
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


class TrainingSession:
    """What ``autobatch train`` needs from PyTorch: a model of the workload trained window by window.

    Used by the training process of :mod:`autobatch.training.train`; the loop over epochs, the
    progress and the checkpoints' timing live there, framework-free.
    """

    def __init__(self, workload: Workload, config: TrialConfig, *, device: str, seed: int, mixed_precision: bool, controller):
        self.device = torch.device(device)
        #: on the CPU an OOM inside oneDNN leaves the process unable to train on: checkpoints let a
        #: new process take over (PyTorch raises its other OOMs, and the process survives them)
        self.crash_prone_oom = self.device.type == "cpu"
        self.on_cuda = self.device.type == "cuda"
        torch.manual_seed(seed)
        self.model = workload.build_model("torch").to(self.device)
        self.model.train()
        self.optimizer = make_optimizer(workload.optimizer, self.model.parameters(), config.learning_rate)
        self.loss_fn = make_loss(workload.loss)
        self.precision = MixedPrecision(self.device, enabled=mixed_precision)
        self.batcher = AdaptiveMicroBatcher(
            self.model,
            self.optimizer,
            self.loss_fn,
            precision=self.precision,
            device=self.device if self.on_cuda else None,
            controller=controller,
        )
        self.x = torch.from_numpy(np.ascontiguousarray(workload.x_train))
        self.y = torch.from_numpy(np.ascontiguousarray(workload.y_train))
        self.is_oom = TorchBackend().is_oom

    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        index = torch.as_tensor(indices, dtype=torch.long)
        x, y = self.x[index], self.y[index]
        if self.on_cuda:
            x, y = x.pin_memory(), y.pin_memory()
        loss = self.batcher.step(x, y, epoch=epoch)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
        try:
            return evaluate(self.model, self.loss_fn, x, y, batch_size, self.device, self.precision)
        finally:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)

    def release(self) -> None:
        """Free what a failed evaluation held."""
        import gc

        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()

    def save(self, path: str) -> None:
        """The trained weights: a ``state_dict`` (``torch.save``), or a numpy archive for ``.npz``."""
        state = self.model.state_dict()
        if str(path).endswith(".npz"):
            with open(path, "wb") as handle:
                np.savez(handle, **{name: value.detach().cpu().numpy() for name, value in state.items()})
        else:
            torch.save(state, path)

    def save_checkpoint(self, path: str) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        torch.save(state, path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and "scaler" in state:
            self.precision.scaler.load_state_dict(state["scaler"])

    def peak_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_reserved(self.device)) if self.on_cuda else None

    def current_memory_bytes(self) -> int | None:
        return int(torch.cuda.memory_reserved(self.device)) if self.on_cuda else None


__all__ += ["AdaptiveMicroBatcher", "TrainingSession"]
