"""The PyTorch backend. Importing this package imports torch.

The same module names as :mod:`autobatch.backends.tensorflow`: ``backend`` (the Backend),
``accumulate`` (the window step), ``data``, ``precision``, ``training`` (optimizers and losses),
``memory`` (OOM classification and allocator peaks), ``adaptive``, ``session`` and ``task`` (a
``TorchTask``, or a ``Workload`` turned into one, built for a trial or a session).
"""

from autobatch.backends.torch.accumulate import GradientNoiseMeter, evaluate, train_window
from autobatch.backends.torch.adaptive import AdaptiveMicroBatcher
from autobatch.backends.torch.backend import TorchBackend
from autobatch.backends.torch.data import ArrayDataset
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.session import TorchTrainingSession
from autobatch.backends.torch.training import supervised_loss

__all__ = [
    "AdaptiveMicroBatcher",
    "ArrayDataset",
    "GradientNoiseMeter",
    "MixedPrecision",
    "TorchBackend",
    "TorchTrainingSession",
    "evaluate",
    "supervised_loss",
    "train_window",
]
