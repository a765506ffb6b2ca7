"""autobatch: the micro-batch size, accumulation steps and learning rate that train fastest without OOM.

The public API is re-exported here. Importing ``autobatch`` imports no framework:
PyTorch and TensorFlow are loaded only inside trial workers.
"""

from autobatch.core.adaptive import (
    Adaptation,
    MicroBatchController,
    MicroBatchOOMError,
    OptimizerStepOOMError,
    UnrecoverableOOMError,
)
from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.core.lr_schedule import LearningRateSchedule
from autobatch.core.memory import MemoryBudget
from autobatch.core.registry import backend_names, get_backend
from autobatch.errors import (
    AutobatchError,
    BackendNotFoundError,
    InvalidParameterError,
    StorageError,
    TaskLoadError,
)
from autobatch.process.worker import run_trial
from autobatch.search.horizon import Horizon
from autobatch.search.results import TuneResult, load_study_result
from autobatch.search.space import SearchSpace
from autobatch.search.tune import tune
from autobatch.tasks.keras_task import KerasTask
from autobatch.tasks.loading import load_task, load_workload
from autobatch.tasks.torch_task import TorchTask
from autobatch.tasks.workload import Workload
from autobatch.training.api import TrainingError, TrainingOOMError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Adaptation",
    "MicroBatchController",
    "MicroBatchOOMError",
    "OptimizerStepOOMError",
    "TrainResult",
    "TrainingError",
    "TrainingOOMError",
    "UnrecoverableOOMError",
    "train",
    "AutobatchError",
    "BackendNotFoundError",
    "Horizon",
    "InvalidParameterError",
    "LearningRateSchedule",
    "MemoryBudget",
    "StorageError",
    "TaskLoadError",
    "TrialBudget",
    "TrialConfig",
    "TrialResult",
    "SearchSpace",
    "TuneResult",
    "KerasTask",
    "TorchTask",
    "Workload",
    "backend_names",
    "get_backend",
    "load_task",
    "load_workload",
    "load_study_result",
    "run_trial",
    "tune",
]
