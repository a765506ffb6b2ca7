"""TensorFlow and Keras, imported quietly: every module of this backend takes ``tf`` and ``keras`` from here.

TensorFlow's start-up notices would reach the user's terminal, Keras must run on TensorFlow,
and inside a memory-capped trial worker the C++ log must keep its OOM warnings (see
:func:`_tensorflow_log_level`), so the import is done once, here, with those settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

__all__ = ["keras", "onednn_allocator", "tf"]


def onednn_allocator() -> str:
    """Where this process's CPU tensors come from, for a trial's extras: "malloc" or "BFC pool"."""
    # set by autobatch.process.child.enter_child under a CPU budget, before TensorFlow is imported
    value = os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "").strip().lower()
    return "malloc" if value in ("1", "true") else "BFC pool"


def _tensorflow_log_level(level: str) -> str:
    """TensorFlow's C++ log level: errors only, or warnings too inside a memory-capped process.

    Under ``RLIMIT_DATA`` (a budgeted trial worker on the CPU) an allocation failure in
    a oneDNN convolution crashes TensorFlow 2.21 with SIGSEGV right after it logs the
    warning "OOM when allocating tensor"; that line, in the worker's log, is then the
    only evidence the worker has that the trial ran out of memory.
    """
    try:
        import resource

        soft_limit, _ = resource.getrlimit(resource.RLIMIT_DATA)
        capped = soft_limit != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        capped = False
    return str(min(int(level), 1)) if capped and level.isdigit() else level


@contextlib.contextmanager
def _stderr_silenced(enabled: bool = True):
    """Send file descriptor 2 to /dev/null for a while.

    TensorFlow 2.21's C++ start-up notices (oneDNN, absl's "before InitializeLog")
    ignore ``TF_CPP_MIN_LOG_LEVEL`` and would reach the user's terminal. A Python
    exception raised inside is printed later, after the descriptor is restored.
    """
    if not enabled:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_REQUESTED_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = _tensorflow_log_level(_REQUESTED_LOG_LEVEL)
if "keras" not in sys.modules:  # Keras picks its backend once, at import; this one needs TensorFlow
    os.environ["KERAS_BACKEND"] = "tensorflow"

# Start-up notices are shown only to someone who asked for TensorFlow's info logs.
with _stderr_silenced(enabled=not (_REQUESTED_LOG_LEVEL.isdigit() and int(_REQUESTED_LOG_LEVEL) < 2)):
    import keras
    import tensorflow as tf

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"autobatch's tensorflow backend needs Keras on TensorFlow, but Keras was imported with the "
        f"{keras.backend.backend()!r} backend; set KERAS_BACKEND=tensorflow or import this module first"
    )
tf.get_logger().setLevel(logging.ERROR)
try:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
except ImportError:  # absl comes with TensorFlow, but nothing here needs it
    pass
