"""Import an object named by ``"package.module:attribute"``: how tasks and backends are found by name."""

from __future__ import annotations

import importlib
from typing import Any

from autobatch.errors import TaskLoadError


def import_object(path: str) -> Any:
    """Import ``"package.module:attribute"``, with an error that says which part failed."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure is the task's fault, not ours
        raise TaskLoadError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise TaskLoadError(f"module {module_name!r} has no attribute {attribute!r}") from None
