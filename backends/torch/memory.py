"""PyTorch's memory as a trial sees it: which errors are out-of-memory errors, the CUDA allocator's
reserved bytes, and giving cached memory back after a failed step."""

from __future__ import annotations

import gc

import torch

from autobatch.backends._oom import unrecoverable_oom
from autobatch.core.adaptive import UnrecoverableOOMError

__all__ = ["ONEDNN_POISONED", "current_memory_bytes", "is_oom", "peak_memory_bytes", "release_cached_memory"]

# What an allocation failure under RLIMIT_DATA looks like on the CPU: the default
# allocator's own message, or oneDNN failing to build a kernel it had no memory for.
_CPU_OOM_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "could not create a primitive")

# CUDA libraries that could not allocate their handle or workspace, outside the caching
# allocator: "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
# (ATen's TORCH_CUDABLAS_CHECK), "cuDNN error: CUDNN_STATUS_ALLOC_FAILED" (cuDNN 8) or
# "... CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED" (cuDNN 9; AT_CUDNN_CHECK).
# A failed cudaMalloc outside the allocator says "CUDA error: out of memory" (AcceleratorError).
_CUDA_LIBRARY_OOM_TEXTS = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
)

# oneDNN's words when it could not build a kernel for want of memory; the process cannot
# run that kind of kernel again (see autobatch.backends.torch.adaptive.AdaptiveMicroBatcher).
ONEDNN_POISONED = "could not create a primitive"


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch's out-of-memory error, on CUDA or on the CPU under ``RLIMIT_DATA``.

    ``torch.OutOfMemoryError`` and ``torch.AcceleratorError`` are RuntimeErrors; a CUDA
    library's allocation failure is one by its text.
    """
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or any(t in text for t in (*_CPU_OOM_TEXTS, *_CUDA_LIBRARY_OOM_TEXTS))
    )


def unrecoverable(error: BaseException) -> UnrecoverableOOMError:
    """oneDNN's failure to build a kernel, which poisons the process, as an UnrecoverableOOMError."""
    return unrecoverable_oom(
        error,
        "PyTorch ran out of memory in oneDNN ({detail}); after that oneDNN refuses every kernel in this "
        "process, whatever the size:",
    )


def peak_memory_bytes(device: str | torch.device) -> int | None:
    """The CUDA allocator's reserved peak; ``None`` off CUDA.

    The cap limits what the caching allocator reserves, so the reserved peak is what is
    compared with the budget.
    """
    return int(torch.cuda.max_memory_reserved(device)) if _is_cuda(device) else None


def current_memory_bytes(device: str | torch.device) -> int | None:
    """The CUDA allocator's reserved bytes now; ``None`` off CUDA."""
    return int(torch.cuda.memory_reserved(device)) if _is_cuda(device) else None


def release_cached_memory() -> None:
    """Free what a failed step held, and give the CUDA cache's blocks back before a redo."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _is_cuda(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")
