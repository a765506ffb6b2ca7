"""The PyTorch backend. Importing this package imports torch.

The same module names as :mod:`autobatch.backends.tensorflow`: ``backend`` (the Backend),
``accumulate`` (the window step), ``data``, ``precision``, ``training`` (optimizers and losses),
``memory`` (OOM classification and allocator peaks), ``adaptive`` and ``session``.
"""

from autobatch.backends.torch.accumulate import GradientNoiseMeter, evaluate, train_window
from autobatch.backends.torch.adaptive import AdaptiveMicroBatcher
from autobatch.backends.torch.backend import TorchBackend
from autobatch.backends.torch.data import ArrayDataset
from autobatch.backends.torch.precision import MixedPrecision
from autobatch.backends.torch.session import TorchTrainingSession

__all__ = [
    "AdaptiveMicroBatcher",
    "ArrayDataset",
    "GradientNoiseMeter",
    "MixedPrecision",
    "TorchBackend",
    "TorchTrainingSession",
    "evaluate",
    "train_window",
]
