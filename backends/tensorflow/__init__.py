"""The TensorFlow backend. Importing this package imports TensorFlow."""

from autobatch.backends.tensorflow.backend import (
    AdaptiveMicroBatchTrainer,
    MicroBatchTrainer,
    TensorFlowBackend,
    TrainingSession,
    fit_adaptive,
    make_adaptive_train_step,
)

__all__ = [
    "AdaptiveMicroBatchTrainer",
    "MicroBatchTrainer",
    "TensorFlowBackend",
    "TrainingSession",
    "fit_adaptive",
    "make_adaptive_train_step",
]
