"""The TensorFlow backend behind the common trial interface: device, memory cap, OOM classification,
peak memory, and what a trial does in TensorFlow (build, window step, evaluation).

The trial itself runs through the framework-neutral template in :mod:`autobatch.backends._trial`;
the window step is :class:`autobatch.backends.tensorflow.accumulate.MicroBatchTrainer`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from autobatch.backends._trial import Trial, TrialBackend
from autobatch.backends.base import DeviceConfigurationError
from autobatch.backends.tensorflow import memory
from autobatch.backends.tensorflow._framework import keras, onednn_allocator, tf
from autobatch.backends.tensorflow.accumulate import MicroBatchTrainer
from autobatch.backends.tensorflow.data import common_spec
from autobatch.backends.tensorflow.precision import MixedPrecision
from autobatch.backends.tensorflow.session import TensorFlowTrainingSession
from autobatch.backends.tensorflow.training import build_training
from autobatch.core.config import TrialBudget, TrialConfig
from autobatch.core.devices import DeviceMemoryMeter
from autobatch.core.noise import MeasuringBudget
from autobatch.core.windows import Window
from autobatch.tasks.loading import Task

__all__ = ["TensorFlowBackend"]


class TensorFlowBackend(TrialBackend):
    name = "tensorflow"
    session_class = TensorFlowTrainingSession

    def __init__(self) -> None:
        #: (device, budget) as configured by :meth:`configure_device`
        self._configured: tuple[str, int | None] | None = None
        self._device_memory: DeviceMemoryMeter | None = None

    def default_device(self) -> str:
        return "cuda:0" if tf.config.list_physical_devices("GPU") else "cpu"

    def fork_safe(self, device: str) -> bool:
        # On the CPU a process forked after the import (no op run yet) trains and
        # repeats exactly (checked with tensorflow-cpu 2.21); TensorFlow's GPU runtime
        # is not known to survive a fork, so GPU trials get a new process each. A task
        # whose loading ran an op (a tf.data pipeline, a tensor) started the eager context
        # and its thread pools, which a forked process does not inherit: its first op
        # would wait for them forever (measured), so each trial gets a new process too.
        return not memory.is_gpu(device) and not _eager_context_started()

    def loads_task_in_trial(self, device: str) -> bool:
        # Building a KerasTask's tf.data pipeline starts the eager context and its thread pools, after
        # which a fork hangs (see fork_safe): on the CPU each forked trial loads the task itself.
        return not memory.is_gpu(device)

    def configure_device(self, device: str, budget_bytes: int | None) -> None:
        """A logical device whose ``memory_limit`` is the budget, or without one, memory growth.

        Both must be set before TensorFlow initialises its context: any op or device query
        (``reset_memory_stats``, ``get_memory_info``) does, and TensorFlow then refuses the
        setting. Without growth an uncapped process would take the whole GPU.
        """
        if not memory.is_gpu(device):
            return  # the worker has set RLIMIT_DATA
        gpu = memory.physical_gpu(device)
        if self._device_memory is None:
            self._device_memory = DeviceMemoryMeter(device)  # before this process touches the GPU
        limit_mib = max(1, int(budget_bytes) // 2**20) if budget_bytes else None
        try:
            if limit_mib is not None:
                logical = tf.config.LogicalDeviceConfiguration(memory_limit=limit_mib)
                tf.config.set_logical_device_configuration(gpu, [logical])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError) as error:
            what = f"a memory limit of {limit_mib} MiB" if limit_mib is not None else "memory growth"
            raise DeviceConfigurationError(
                f"TensorFlow could not apply {what} to {device}: {error}. TensorFlow had initialised the GPU "
                "before autobatch could configure it (an op or a device query while importing the backend or "
                "loading the task); the trial would run without its memory cap"
            ) from error
        self._configured = (device, budget_bytes)

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        if not memory.is_gpu(device):
            return  # the worker has set RLIMIT_DATA
        if self._configured != (device, budget_bytes):
            self.configure_device(device, budget_bytes)  # fails loudly if TensorFlow is initialised already

    def is_oom(self, error: BaseException) -> bool:
        # The error or what it was raised from: TensorFlow on the CPU wraps some OOMs (see is_oom_error).
        return memory.is_oom_error(error)

    def peak_memory_bytes(self, device: str) -> int | None:
        return memory.memory_info(device, "peak")

    def current_memory_bytes(self, device: str) -> int | None:
        return memory.memory_info(device, "current")

    def device_overhead_bytes(self, device: str) -> int | None:
        """What this process holds on the GPU beyond the allocator's pool.

        Under a cap the allocator (BFC, without growth) takes ``memory_limit`` on its first
        allocation and allocates within it; without a cap it grows by regions TensorFlow
        does not report, and what lies outside cannot be told apart: ``None``.
        """
        configured = self._configured
        if not memory.is_gpu(device) or self._device_memory is None or configured is None or not configured[1]:
            return None
        pool = max(1, int(configured[1]) // 2**20) * 2**20
        return self._device_memory.outside_bytes(pool)

    def reset_peak_memory(self, device: str) -> None:
        if memory.is_gpu(device):
            tf.config.experimental.reset_memory_stats(memory.tf_device_name(device))

    @contextlib.contextmanager
    def trial_scope(self, device: str) -> Iterator[None]:
        if memory.is_gpu(device):
            memory.physical_gpu(device)  # fail loudly rather than let soft placement run on the CPU
            if self._configured is None or self._configured[0] != device:
                self.configure_device(device, None)  # no cap: take what is used, not the whole GPU (or fail)
        with tf.device(memory.tf_device_name(device)):
            yield

    def start_trial(self, task: Task, config: TrialConfig, budget: TrialBudget, device: str) -> TensorFlowTrial:
        return TensorFlowTrial(task, config, budget, device)


class TensorFlowTrial(Trial):
    """A trial's Keras model, optimizer, loss, precision and data, built once inside the trial's device scope.

    ``task`` is a :class:`~autobatch.tasks.workload.Workload` (a model builder, arrays, a loss and
    an optimizer by name) or a :class:`~autobatch.tasks.keras_task.KerasTask` (a compiled model and
    its data): see :func:`autobatch.backends.tensorflow.training.build_training`.
    """

    def __init__(self, task: Task, config: TrialConfig, budget: TrialBudget, device: str):
        super().__init__(config, budget)
        keras.utils.set_random_seed(budget.seed)
        precision = MixedPrecision(device, enabled=budget.mixed_precision)
        training = build_training(task, config.learning_rate, precision)
        x_spec, y_spec = common_spec(training.train, training.val)
        self.trainer = MicroBatchTrainer(
            training.model,
            training.optimizer,
            training.loss,
            x_spec=x_spec,
            y_spec=y_spec,
            measure_noise=self.measures_noise,
        )
        self.measuring = MeasuringBudget()
        self._norm_seconds: float | None = None  # a pass of the noise norms, timed after the first window
        self.data, self.val = training.train, training.val
        self.n_train = self.data.n
        self.sample_sizes = self.data.sizes
        self.optimizer_name = training.optimizer_name

    def feed(self, chunks: Iterator[list[Window]]) -> Iterator[tuple[Window, Iterator]]:
        return self.data.windows(chunks)

    def train_window(self, window: Window, micro_batches: Iterator, measure: bool) -> float:
        trainer = self.trainer
        sizes = window.micro_batches
        if self.config.accumulation_steps == 1:  # a window is one micro-batch: one call, no accumulators
            return float(trainer.step(*next(micro_batches)))  # reading the loss waits for the update to finish
        # A short last micro-batch would give the estimator a third batch size, and a window of one
        # micro-batch (a sample budget below the micro-batch) no second one: their windows are left out.
        # Full windows are summed on the device and read once (finish); another size, rare, is read here.
        eligible = measure and trainer.measures_noise and len(sizes) > 1 and len({len(mb) for mb in sizes}) == 1
        # The norms cost a small model 5-10 % of its window: measure the windows the budget allows.
        noise = eligible and self.measuring.due()
        counted = noise and window.size == self.config.effective_batch_size
        last = len(sizes) - 1
        loss = None
        started = time.perf_counter()
        # not strict: a check that the lazy micro-batches ran out would take the next window's first
        for position, (indices, (x, y)) in enumerate(zip(sizes, micro_batches, strict=False)):
            share = trainer.scalar(len(indices) / window.size)
            if position < last:
                trainer.accumulate(x, y, share, measure=noise)
            else:
                loss = trainer.finish(x, y, share, measure=noise, count_noise=counted)
        value = float(loss)  # reading the loss waits for the update to finish
        if eligible:
            seconds = time.perf_counter() - started
            if self._norm_seconds is None:  # after a window: the accumulators exist and the device is warm
                self._norm_seconds = trainer.norm_seconds()
            # A measured window computes the norms once per micro-batch and once for the window.
            self.measuring.window_done(seconds, self._norm_seconds * (len(sizes) + 1) if noise else None)
        if noise and not counted:
            self.noise.add_window(self.config.micro_batch_size, window.size, *trainer.last_noise_norms())
        return value

    def finish(self) -> None:
        if self.trainer.measures_noise:
            windows, skipped, micro_sq_sum, window_sq_sum = self.trainer.noise_totals()
            self.noise.add_windows(
                self.config.micro_batch_size,
                self.config.effective_batch_size,
                windows,
                skipped,
                micro_sq_sum,
                window_sq_sum,
            )

    def scale_learning_rate(self, multiplier: float) -> None:
        self.trainer.set_learning_rate(self.config.learning_rate * multiplier)

    def evaluate(self, batch_size: int, limit: int | None) -> float:
        return self.trainer.evaluate_data(self.val, batch_size, limit)

    def extras(self) -> dict[str, Any]:
        return {**super().extras(), "traces": dict(self.trainer.trace_counts), "tensor_allocator": onednn_allocator()}


def _eager_context_started() -> bool:
    """Whether this process has started TensorFlow's eager context (and so its thread pools)."""
    try:
        from tensorflow.python.eager import context
    except ImportError:  # a TensorFlow without this module: assume the worst
        return True
    return getattr(context.context(), "_context_handle", True) is not None
