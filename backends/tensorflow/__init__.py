"""The TensorFlow backend. Importing this package imports TensorFlow (quietly: see ``_framework``).

The same module names as :mod:`autobatch.backends.torch`: ``backend`` (the Backend),
``accumulate`` (the window step), ``data``, ``precision``, ``training`` (optimizers and losses),
``memory`` (OOM classification, allocator bytes, device names), ``adaptive`` and ``session``.
"""

from autobatch.backends.tensorflow.accumulate import MicroBatchTrainer
from autobatch.backends.tensorflow.adaptive import AdaptiveMicroBatchTrainer, fit_adaptive, make_adaptive_train_step
from autobatch.backends.tensorflow.backend import TensorFlowBackend
from autobatch.backends.tensorflow.data import ArrayData, batch_spec
from autobatch.backends.tensorflow.memory import is_oom_error
from autobatch.backends.tensorflow.precision import MixedPrecision
from autobatch.backends.tensorflow.session import TensorFlowTrainingSession

__all__ = [
    "AdaptiveMicroBatchTrainer",
    "ArrayData",
    "MicroBatchTrainer",
    "MixedPrecision",
    "TensorFlowBackend",
    "TensorFlowTrainingSession",
    "batch_spec",
    "fit_adaptive",
    "is_oom_error",
    "make_adaptive_train_step",
]
