"""PyTorch mixed precision: autocast, and on CUDA a GradScaler that steps once per window."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["MixedPrecision"]


class MixedPrecision:
    """Autocast (float16 on CUDA, bfloat16 on the CPU) and, on CUDA, a GradScaler that steps once per window."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if enabled and device.type == "cuda" else None

    def autocast(self) -> contextlib.AbstractContextManager:
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
