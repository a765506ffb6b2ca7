"""What ``autobatch train`` needs from TensorFlow: a Keras model of the task trained window by window.

The loop over epochs, the progress and the checkpoints' timing live in :mod:`autobatch.training`,
framework-free; it reaches this session through ``TensorFlowBackend.training_session``.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np

from autobatch.backends.base import DeviceConfigurationError, TrainingSession
from autobatch.backends.tensorflow import memory
from autobatch.backends.tensorflow._framework import keras, tf
from autobatch.backends.tensorflow.accumulate import MicroBatchTrainer
from autobatch.backends.tensorflow.adaptive import AdaptiveMicroBatchTrainer
from autobatch.backends.tensorflow.data import common_spec
from autobatch.backends.tensorflow.precision import MixedPrecision
from autobatch.backends.tensorflow.training import build_training
from autobatch.core.adaptive import MicroBatchController
from autobatch.core.config import TrialConfig
from autobatch.tasks.loading import Task

__all__ = ["TensorFlowTrainingSession"]


class TensorFlowTrainingSession(TrainingSession):
    """A Keras model of ``task`` (a Workload or a KerasTask) trained window by window, at the micro-batch
    ``controller`` keeps.

    Each micro-batch is gathered from the samples held in memory when the window step reaches
    it, padded to its own longest: a window split after an OOM pads its smaller micro-batches
    to their own longest too.
    """

    def __init__(
        self,
        task: Task,
        config: TrialConfig,
        *,
        device: str,
        seed: int,
        mixed_precision: bool,
        controller: MicroBatchController,
    ):
        if memory.is_gpu(device):
            _check_configured(memory.physical_gpu(device), device)
        #: on the CPU TensorFlow's OOMs crash or poison the process: each is redone in a new one
        self.crash_prone_oom = not memory.is_gpu(device)
        self.device_name = memory.tf_device_name(device)
        keras.utils.set_random_seed(seed)
        precision = MixedPrecision(device, enabled=mixed_precision)
        with tf.device(self.device_name):
            training = build_training(task, config.learning_rate, precision)
            self.model, self.optimizer = training.model, training.optimizer
            x_spec, y_spec = common_spec(training.train, training.val)
            trainer = MicroBatchTrainer(self.model, self.optimizer, training.loss, x_spec=x_spec, y_spec=y_spec)
            self.step = AdaptiveMicroBatchTrainer(
                self.model,
                self.optimizer,
                training.loss,
                controller=controller,
                trainer=trainer,
                recover_in_process=not self.crash_prone_oom,
            )
        self.train, self.val = training.train, training.val
        self.n_train = self.train.n
        self.optimizer_name = training.optimizer_name
        self.learning_rate = config.learning_rate  # what a schedule's multiplier scales
        self._device = device

    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        indices = np.asarray(indices)

        def micro_batch(start: int, stop: int) -> tuple[Any, Any]:
            return self.train.batch(indices[start:stop])

        with tf.device(self.device_name):
            return self.step.step_samples(len(indices), micro_batch, epoch=epoch)

    def scale_learning_rate(self, multiplier: float) -> None:
        self.step.trainer.set_learning_rate(self.learning_rate * multiplier)

    def evaluate(self, batch_size: int) -> float:
        with tf.device(self.device_name):
            try:
                return self.step.trainer.evaluate_data(self.val, batch_size)
            except Exception as error:
                if not memory.is_oom_error(error) or isinstance(error, tf.errors.ResourceExhaustedError):
                    raise
                raise memory.unrecoverable(error) from error

    def release(self) -> None:
        gc.collect()

    def save(self, path: str) -> None:
        """``.keras``: the whole model; ``.weights.h5``: its weights; ``.npz``: every variable by path."""
        path = str(path)
        if path.endswith(".npz"):
            arrays: dict[str, Any] = {variable.path: np.asarray(variable.numpy()) for variable in self.model.variables}
            with open(path, "wb") as handle:
                np.savez(handle, **arrays)
        elif path.endswith(".weights.h5"):
            self.model.save_weights(path)
        else:
            self.model.save(path)

    def save_checkpoint(self, path: str) -> None:
        values = [variable.numpy() for variable in self._state_variables()]
        with open(path, "wb") as handle:
            np.savez(handle, *values)

    def load_checkpoint(self, path: str) -> None:
        with np.load(path) as archive:
            values = [archive[f"arr_{i}"] for i in range(len(archive.files))]
        variables = self._state_variables()
        if len(values) != len(variables):
            raise RuntimeError(
                f"checkpoint {path} holds {len(values)} variables, the model and optimizer {len(variables)}"
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    def is_oom(self, error: BaseException) -> bool:
        return memory.is_oom_error(error)

    def peak_memory_bytes(self) -> int | None:
        return memory.memory_info(self._device, "peak")

    def current_memory_bytes(self) -> int | None:
        return memory.memory_info(self._device, "current")

    def _state_variables(self) -> list:
        return [*self.model.variables, *self.optimizer.variables]


def _check_configured(gpu, device: str) -> None:
    """Fail unless the GPU has a memory limit or memory growth: uncapped, TensorFlow would take all of it.

    The training process configures the GPU first (``TensorFlowBackend.configure_device``,
    before the task loads); a session made elsewhere gets memory growth here, while that can
    still be set, and an error where it cannot.
    """
    if tf.config.get_logical_device_configuration(gpu) or tf.config.experimental.get_memory_growth(gpu):
        return
    try:
        tf.config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError) as error:
        raise DeviceConfigurationError(
            f"TensorFlow could not apply memory growth to {device}: {error}; it would take the whole GPU"
        ) from error
