"""What is trained: a :class:`Workload` of arrays, a :class:`TorchTask` or a :class:`KerasTask`, loaded by name."""

from autobatch.tasks.keras_task import KerasTask
from autobatch.tasks.loading import Task, load_task, load_workload, task_framework, task_path
from autobatch.tasks.torch_task import TorchTask
from autobatch.tasks.workload import Workload

__all__ = ["KerasTask", "Task", "TorchTask", "Workload", "load_task", "load_workload", "task_framework", "task_path"]
