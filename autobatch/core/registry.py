"""Backends by name, from the ``autobatch.backends`` entry-point group.

The core never imports a framework: it asks this registry for a backend class by
name, and only the trial worker instantiates it. A third party adds a backend by
declaring an entry point in that group; an import path ``"module:Class"`` works too.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from autobatch.core.imports import import_object
from autobatch.errors import BackendNotFoundError, TaskLoadError

ENTRY_POINT_GROUP = "autobatch.backends"

# Used when autobatch runs from a source tree that was never installed.
_BUILTIN = {
    "torch": "autobatch.backends.torch:TorchBackend",
    "tensorflow": "autobatch.backends.tensorflow:TensorFlowBackend",
}


def backend_names() -> list[str]:
    names = set(_BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def backend_path(name: str) -> str:
    """The ``module:Class`` path of backend ``name`` (or ``name`` itself if it is a path)."""
    if ":" in name:
        return name
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.value
    if name in _BUILTIN:
        return _BUILTIN[name]
    raise BackendNotFoundError(f"backend={name!r} is unknown; available: {', '.join(backend_names())}")


def get_backend(name: str) -> Any:
    """A new instance of backend ``name``. Importing it imports its framework."""
    path = backend_path(name)
    try:
        backend_class = import_object(path)
    except TaskLoadError as error:
        raise BackendNotFoundError(f"backend={name!r} cannot be loaded: {error}") from None
    return backend_class()
