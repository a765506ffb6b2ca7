"""How a task is named and loaded: a study's short name, ``"package.module:factory"``, or the factory itself.

A task must be rebuilt in every trial worker, so it travels by name: :func:`task_path` turns a
factory function into the import path a worker can load, once, at the boundary (Optuna's
``get_storage`` style), and :func:`load_task` builds the task from a name in any process.
"""

from __future__ import annotations

from typing import Any

from autobatch.core.imports import import_object
from autobatch.errors import InvalidParameterError, TaskLoadError
from autobatch.tasks.keras_task import KerasTask
from autobatch.tasks.torch_task import TorchTask
from autobatch.tasks.workload import Workload

__all__ = ["TASK_TYPES", "Task", "load_task", "load_workload", "task_framework", "task_path"]

#: what a task factory may return
Task = Workload | TorchTask | KerasTask
TASK_TYPES = (Workload, TorchTask, KerasTask)
_WHAT = "a study name, an import path 'package.module:factory', or an importable factory function"


def task_path(task: Any) -> str:
    """The name a worker loads ``task`` by: a study name or path as given, or a factory's import path.

    A factory function (or class) given as an object is named by its ``__module__`` and
    ``__qualname__``; one defined in ``__main__``, inside another function, or as a lambda has
    no such name, and is refused here rather than failing in every worker.
    """
    if isinstance(task, str):
        if not task:
            raise InvalidParameterError("task", task, f"must be {_WHAT}")
        return task
    if not callable(task) or isinstance(task, TASK_TYPES):
        raise InvalidParameterError("task", _short(task), f"must be {_WHAT} (a task object cannot reach the workers)")
    module, qualname = getattr(task, "__module__", None), getattr(task, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        where = (
            "in __main__"
            if module == "__main__" and "<" not in (qualname or "")
            else "as a lambda or inside a function"
        )
        raise InvalidParameterError(
            "task",
            _short(task),
            f"must be importable by the workers: the factory is defined {where}; move it to a module",
        )
    path = f"{module}:{qualname}"
    try:
        found = import_object(path) if "." not in qualname else _import_nested(module, qualname)
    except TaskLoadError:
        found = None
    if found is not task:
        raise InvalidParameterError("task", _short(task), f"must be importable as {path!r} by the workers; it is not")
    return path


def load_task(task: Any) -> Task:
    """Build the task named by a study name, an import path or a factory function (:func:`task_path`)."""
    from autobatch.studies import STUDIES

    name = task_path(task)
    path = STUDIES.get(name, name)
    if ":" not in path:
        raise TaskLoadError(
            f"task={name!r}: no study of that name, and not an import path 'package.module:factory'; "
            f"studies: {', '.join(sorted(STUDIES))}"
        )
    try:
        factory = _import_nested(*path.split(":", 1))
    except TaskLoadError as error:
        raise TaskLoadError(f"task={name!r}: {error}") from None
    if isinstance(factory, TASK_TYPES) or not callable(factory):
        built = factory
    else:
        try:
            built = factory()
        except InvalidParameterError as error:  # a task the factory built refused its own fields
            raise TaskLoadError(f"task={name!r}: {error}") from None
        except Exception as error:  # the user's factory failed: bad input, not our crash
            raise TaskLoadError(f"task={name!r}: {path} raised {type(error).__name__}: {error}") from None
    if not isinstance(built, TASK_TYPES):
        raise TaskLoadError(
            f"task={name!r}: {path} gave {type(built).__name__}, expected an autobatch.TorchTask, "
            "autobatch.KerasTask or autobatch.Workload"
        )
    return built


def load_workload(task: Any) -> Task:
    """:func:`load_task` by its first name, from when every task was a :class:`Workload`."""
    return load_task(task)


def task_framework(task: Task, backend: str | None) -> str:
    """The backend a task runs on: the one named, which the task must support, or the task's own."""
    frameworks = task.frameworks
    if backend is None:
        return "torch" if "torch" in frameworks else frameworks[0]
    if ":" not in backend and backend not in frameworks:
        raise InvalidParameterError(
            "backend", backend, f"must be one that task {task.name!r} has a model for: {', '.join(frameworks)}"
        )
    return backend


def _import_nested(module: str, qualname: str) -> Any:
    """``module:Outer.inner``: a class attribute, as ``__qualname__`` names it."""
    head, *rest = qualname.split(".")
    found = import_object(f"{module}:{head}")
    for part in rest:
        try:
            found = getattr(found, part)
        except AttributeError:
            raise TaskLoadError(f"{module}:{qualname} has no attribute {part!r}") from None
    return found


def _short(value: Any) -> str:
    text = getattr(value, "__qualname__", None) or type(value).__name__
    return str(text)
