"""TensorFlow's memory as a trial sees it: which errors are out-of-memory errors, the GPU allocator's
bytes, and the devices' names (a device string as the rest of autobatch writes it, ``cuda:0``)."""

from __future__ import annotations

from autobatch.backends._oom import unrecoverable_oom
from autobatch.backends.tensorflow._framework import tf
from autobatch.core.adaptive import UnrecoverableOOMError

__all__ = [
    "allow_memory_growth",
    "is_gpu",
    "is_oom_error",
    "memory_info",
    "physical_gpu",
    "tf_device_name",
    "unrecoverable",
]

_OOM_TEXTS = (
    "OOM when allocating",
    "ResourceExhausted",
    "std::bad_alloc",
    "Failed to allocate memory",
    # A copy to the GPU whose destination could not be allocated comes as InternalError
    # "Dst tensor is not initialized." (tensorflow/tensorflow#7025).
    "Dst tensor is not initialized",
)

# cuBLAS and cuDNN that could not allocate their handle or workspace, in whatever error
# carries their status: cuDNN 8 says ALLOC_FAILED, cuDNN 9 INTERNAL_ERROR_*_ALLOCATION_FAILED.
_CUDA_LIBRARY_OOM_TEXTS = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
)

# oneDNN kernels that cannot allocate their scratch memory raise these, as AbortedError
# ("Compute received an exception: ... could not create a memory object" in MaxPoolGrad).
# "could not execute a primitive" (oneDNN's runtime error, in the fused MatMul) came in 4 of
# 40 trials past the wall under a CPU budget (tensorflow-cpu 2.21), in none of ~60 within it.
_ONEDNN_OOM_TEXTS = (
    "could not create a memory object",
    "could not create a primitive",
    "could not execute a primitive",
)


def is_oom_error(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, shows TensorFlow ran out of memory.

    :meth:`TensorFlowBackend.is_oom` is this function, so trials and training agree.

    oneDNN's allocation failures come as ``AbortedError``; an allocation that fails while
    a ``tf.function`` binds its inputs or serialises its graph comes as a ``TypeError``
    whose cause is numpy's ``MemoryError``, or as protobuf's ``EncodeError``.
    """
    if isinstance(error, UnrecoverableOOMError):
        return False  # already judged: not one to redo in this process
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)):
            return True
        if isinstance(error, (tf.errors.InternalError, tf.errors.UnknownError, RuntimeError)) and any(
            marker in str(error) for marker in _OOM_TEXTS
        ):
            return True
        if isinstance(error, tf.errors.AbortedError) and any(text in str(error) for text in _ONEDNN_OOM_TEXTS):
            return True
        if isinstance(error, (tf.errors.OpError, RuntimeError)) and any(
            text in str(error) for text in _CUDA_LIBRARY_OOM_TEXTS
        ):
            return True
        if type(error).__name__ == "EncodeError" and "Failed to serialize" in str(error):
            return True
        if "Unable to allocate" in str(error):  # numpy's MemoryError, re-raised by tf.function's binding
            return True
        error = error.__cause__ or error.__context__
    return False


def unrecoverable(error: BaseException) -> UnrecoverableOOMError:
    """An OOM this process cannot train on from (an aborted runtime, a grown allocator), as an UnrecoverableOOMError."""
    return unrecoverable_oom(
        error,
        "TensorFlow ran out of memory in a way this process cannot train on from ({detail}): its runtime may have "
        "aborted, and its allocator keeps the memory it took;",
    )


def memory_info(device: str, key: str) -> int | None:
    """The GPU allocator's ``current`` or ``peak`` bytes; ``None`` on the CPU or where TensorFlow has no GPU."""
    if not is_gpu(device):
        return None
    try:
        return int(tf.config.experimental.get_memory_info(tf_device_name(device))[key])
    except (ValueError, RuntimeError):
        return None


def physical_gpu(device: str):
    """TensorFlow's GPU for ``device``; fails loudly rather than let soft placement run on the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    index = _device_index(device)
    if index >= len(gpus):
        raise RuntimeError(
            f"device={device!r}: TensorFlow {tf.__version__} sees {len(gpus)} GPU(s); "
            "tensorflow-cpu cannot use a GPU (install tensorflow[and-cuda]), or run on device='cpu'"
        )
    return gpus[index]


def allow_memory_growth(gpu) -> None:
    """Without a cap, take what is used rather than the whole GPU."""
    try:
        tf.config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError):  # the GPU is initialised already, or has virtual devices
        pass


def is_gpu(device: str) -> bool:
    return device.startswith(("cuda", "gpu", "GPU", "/GPU"))


def tf_device_name(device: str) -> str:
    return f"/GPU:{_device_index(device)}" if is_gpu(device) else "/CPU:0"


def _device_index(device: str) -> int:
    _, _, index = device.rpartition(":")
    return int(index) if index.isdigit() else 0
