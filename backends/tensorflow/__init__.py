"""The TensorFlow backend. Importing this package imports TensorFlow (quietly: see ``_framework``).

The same module names as :mod:`autobatch.backends.torch`: ``backend`` (the Backend),
``accumulate`` (the window step), ``data`` (a task's samples in memory, padded per micro-batch),
``precision``, ``training`` (a task's model, optimizer and loss),
``memory`` (OOM classification, allocator bytes, device names), ``adaptive`` and ``session``.
"""

from autobatch.backends.tensorflow.accumulate import MicroBatchTrainer
from autobatch.backends.tensorflow.adaptive import AdaptiveMicroBatchTrainer, fit_adaptive, make_adaptive_train_step
from autobatch.backends.tensorflow.backend import TensorFlowBackend
from autobatch.backends.tensorflow.data import ArrayData, SampleData, batch_spec, read_keras_data
from autobatch.backends.tensorflow.memory import is_oom_error
from autobatch.backends.tensorflow.precision import MixedPrecision
from autobatch.backends.tensorflow.session import TensorFlowTrainingSession

__all__ = [
    "AdaptiveMicroBatchTrainer",
    "ArrayData",
    "MicroBatchTrainer",
    "MixedPrecision",
    "SampleData",
    "TensorFlowBackend",
    "TensorFlowTrainingSession",
    "batch_spec",
    "fit_adaptive",
    "is_oom_error",
    "make_adaptive_train_step",
    "read_keras_data",
]
