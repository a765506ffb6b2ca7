"""PyTorch tasks whose loaders touch CUDA before the trial child forks, for test_fork_safety and test_gpu."""

from __future__ import annotations

import os

import numpy as np
import torch

from autobatch.backends.torch.backend import TorchBackend
from autobatch.tasks.workload import Workload


def _tiny() -> Workload:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=64).astype(np.int64)
    return Workload(name="tiny", x_train=x, y_train=y, x_val=x[:16], y_val=y[:16], models={"torch": _linear})


def _linear():
    return torch.nn.Linear(4, 2)


def asks_for_cuda() -> Workload:
    """A loader that calls torch.cuda.is_available(), as many do."""
    torch.cuda.is_available()
    return _tiny()


def initialises_cuda() -> Workload:
    """A loader that leaves CUDA initialised (``torch.cuda.init()``).

    Without a GPU there is no CUDA to initialise: the state such a loader leaves is simulated.
    """
    if torch.cuda.is_available():
        torch.cuda.init()
    else:
        torch.cuda.is_initialized = lambda: True
    return _tiny()


class ReportingTorchBackend(TorchBackend):
    """The PyTorch backend, reporting how the trial process was started."""

    def run_trial(self, workload, config, budget, device, progress):
        measured = super().run_trial(workload, config, budget, device, progress)
        measured.extras["nvml_based_cuda_check"] = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        return measured


def computes_its_data_with_torch():
    """A TorchTask whose factory labels its data with tensor ops big enough to run on several threads."""
    import torch
    from torch.utils.data import TensorDataset

    from autobatch import TorchTask

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 784, generator=generator)
    y = (x @ x[:64].T).argmax(1) % 2  # a matrix product: OpenMP's thread team, in the worker
    return TorchTask(
        model=lambda: torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)),
        train_data=TensorDataset(x[:4000], y[:4000]),
        val_data=TensorDataset(x[4000:], y[4000:]),
    )


def builds_a_tf_data_pipeline():
    """A KerasTask whose factory makes a tf.data pipeline: TensorFlow's eager context starts in the worker."""
    import keras
    import numpy as np
    import tensorflow as tf

    from autobatch import KerasTask

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)

    def model():
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])
        net.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return net

    return KerasTask(
        model=model,
        train_data=tf.data.Dataset.from_tensor_slices((x[:384], y[:384])),
        val_data=tf.data.Dataset.from_tensor_slices((x[384:], y[384:])),
    )
