"""The PyTorch backend. Importing this package imports torch."""

from autobatch.backends.torch.backend import AdaptiveMicroBatcher, TorchBackend, TrainingSession, train_window

__all__ = ["AdaptiveMicroBatcher", "TorchBackend", "TrainingSession", "train_window"]
