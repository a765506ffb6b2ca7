"""Keras mixed precision for a trial: the policy while the model is built, loss scaling on a GPU."""

from __future__ import annotations

import contextlib

from autobatch.backends.tensorflow._framework import keras
from autobatch.backends.tensorflow.memory import is_gpu

__all__ = ["MixedPrecision"]


class MixedPrecision:
    """Keras mixed precision: ``mixed_float16`` with loss scaling on a GPU, ``mixed_bfloat16`` on the CPU.

    The policy is set only while the model is built (layers take it then), so it does
    not leak into later models in the same process. bfloat16 has float32's range, so
    the CPU needs no loss scaling.
    """

    def __init__(self, device: str, enabled: bool):
        self.enabled = enabled
        self.loss_scaling = enabled and is_gpu(device)
        self.policy = ("mixed_float16" if is_gpu(device) else "mixed_bfloat16") if enabled else None

    @contextlib.contextmanager
    def policy_scope(self):
        if self.policy is None:
            yield
            return
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)
        try:
            yield
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def wrap(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        return keras.mixed_precision.LossScaleOptimizer(optimizer) if self.loss_scaling else optimizer
