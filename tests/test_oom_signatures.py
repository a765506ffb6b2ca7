"""Out-of-memory errors that do not say "out of memory" are still out-of-memory errors: each backend's
is_oom knows them (and nothing else), and the worker knows them in the log of a child that died.

The messages are the libraries' own: ATen's TORCH_CUDABLAS_CHECK and AT_CUDNN_CHECK
(aten/src/ATen/cuda/Exceptions.h), cuDNN 8's and 9's status names, TensorFlow's copy to a GPU it
could not allocate on (tensorflow/tensorflow#7025) and oneDNN's failures under a CPU budget.
"""

import os
import signal
import sys

import numpy as np
import pytest

from autobatch import TrialBudget, TrialConfig
from autobatch.process.worker import TrialWorker
from autobatch.tasks.workload import Workload

CUBLAS_ALLOC = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN8_ALLOC = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
CUDNN9_ALLOC = "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"
CUDNN9_HOST_ALLOC = "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"
DST_TENSOR = (
    "Failed copying input tensor from /job:localhost/replica:0/task:0/device:CPU:0 to "
    "/job:localhost/replica:0/task:0/device:GPU:0 in order to run _EagerConst: Dst tensor is not initialized."
)
# As tensorflow-cpu 2.21 raised it past the wall under a CPU budget (AbortedError).
ONEDNN_EXECUTE = (
    "Graph execution error:\n\nDetected at node synthetic_cnn_1/dense_1/BiasAdd defined at (most recent call last):\n"
    "Operation received an exception:Status: 5, message: could not execute a primitive, in file "
    "tensorflow/core/kernels/mkl/mkl_matmul_op_fused.cc:306"
)
# Failures of the same libraries that are not for want of memory.
CUBLAS_INVALID = "CUDA error: CUBLAS_STATUS_INVALID_VALUE when calling `cublasSgemm( handle, opa, opb, m, n, k)`"
CUDNN_NOT_SUPPORTED = (
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."
)
SHAPES = "mat1 and mat2 shapes cannot be multiplied (4x3 and 4x5)"


@pytest.mark.parametrize(
    "message", [CUBLAS_ALLOC, CUDNN8_ALLOC, CUDNN9_ALLOC, CUDNN9_HOST_ALLOC, "CUDA error: out of memory"]
)
def test_torch_takes_cuda_library_allocation_failures_as_oom(message):
    torch = pytest.importorskip("torch")
    from autobatch.backends.torch.memory import is_oom

    assert is_oom(RuntimeError(message))
    assert is_oom(torch.AcceleratorError(message))  # what CUDA errors are raised as since torch 2.8


@pytest.mark.parametrize("message", [CUBLAS_INVALID, CUDNN_NOT_SUPPORTED, SHAPES])
def test_torch_takes_other_failures_of_those_libraries_as_errors(message):
    torch = pytest.importorskip("torch")
    from autobatch.backends.torch.memory import is_oom

    assert not is_oom(RuntimeError(message))
    assert not is_oom(torch.AcceleratorError(message))
    assert not is_oom(ValueError(CUBLAS_ALLOC))  # not PyTorch's error, whatever it says


@pytest.mark.parametrize(
    "error_type, message",
    [
        ("InternalError", DST_TENSOR),
        ("InternalError", CUBLAS_ALLOC),
        ("UnknownError", CUDNN8_ALLOC),
        ("FailedPreconditionError", CUDNN9_ALLOC),
        ("AbortedError", ONEDNN_EXECUTE),
    ],
)
def test_tensorflow_takes_these_failures_as_oom_also_when_reraised(error_type, message):
    tf = pytest.importorskip("tensorflow")
    from autobatch.backends.tensorflow.memory import is_oom_error

    error = getattr(tf.errors, error_type)(None, None, message)
    assert is_oom_error(error)
    try:
        try:
            raise error
        except tf.errors.OpError as inner:
            raise RuntimeError("the window step failed") from inner
    except RuntimeError as outer:
        assert is_oom_error(outer)


@pytest.mark.parametrize(
    "error_type, message",
    [
        ("InternalError", CUBLAS_INVALID),
        ("InternalError", "Src tensor is not initialized."),
        ("InvalidArgumentError", "Matrix size-incompatible: In[0]: [4,3], In[1]: [4,5]"),
        ("AbortedError", "Operation received an exception: could not create a descriptor for a convolution"),
        ("UnknownError", CUDNN_NOT_SUPPORTED),
    ],
)
def test_tensorflow_takes_other_failures_as_errors(error_type, message):
    tf = pytest.importorskip("tensorflow")
    from autobatch.backends.tensorflow.memory import is_oom_error

    assert not is_oom_error(getattr(tf.errors, error_type)(None, None, message))


# --- the worker: a child that dies instead of reporting ------------------------------------------------

#: micro-batch size -> how the trial's first forward pass ends the process
DEATHS = {
    1: ("print", CUBLAS_ALLOC, "abort"),
    2: ("print", DST_TENSOR, "exit"),
    3: ("print", "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", "kill"),
    4: ("print", CUBLAS_INVALID, "abort"),
    5: ("silent", "", "segv"),
    6: ("print", "LLVM ERROR: pthread_create failed: Resource temporarily unavailable", "abort"),
}


def dying_task() -> Workload:
    """A workload whose model ends its process in the first forward pass, as ``DEATHS[len(x)]`` says."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=32).astype(np.int64)
    return Workload(
        name="dying", x_train=x, y_train=y, x_val=x[:8], y_val=y[:8], models={"torch": f"{__name__}:_dying_model"}
    )


def _dying_model():
    import torch

    class Dying(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x):
            _, text, how = DEATHS[len(x)]
            if text:
                print(f"RuntimeError: {text}", file=sys.stderr, flush=True)
            if how == "abort":
                os.abort()  # as a C++ exception that nothing catches ends it: SIGABRT
            elif how == "exit":
                os._exit(1)
            elif how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                os.kill(os.getpid(), signal.SIGSEGV)
            return self.linear(x)

    return Dying()


@pytest.mark.slow
def test_the_worker_takes_a_child_that_died_printing_an_oom_signature_as_oom():
    pytest.importorskip("torch")
    budget = TrialBudget(train_samples=8, val_samples=8, warmup_steps=0, min_timed_steps=1, measure_noise=False)
    statuses = {}
    with TrialWorker(f"{__name__}:dying_task", "torch", device="cpu") as worker:  # no budget
        for micro_batch in DEATHS:
            result = worker.run(TrialConfig(micro_batch), budget)
            statuses[micro_batch] = (result.status, result.oom_phase)
    # A signature in the log makes it an OOM, however the process ended; none, and it stays an error.
    assert statuses == {
        1: ("oom", "train"),
        2: ("oom", "train"),
        3: ("oom", "train"),
        4: ("error", None),
        5: ("error", None),
        6: ("error", None),  # no budget: a limit on threads, not on memory
    }

    # A silent crash in training under a CPU budget: a failed allocation in native code.
    with TrialWorker(f"{__name__}:dying_task", "torch", memory_budget="4GiB", device="cpu") as worker:
        crashed = worker.run(TrialConfig(5), budget)
        invalid = worker.run(TrialConfig(4), budget)
        no_thread = worker.run(TrialConfig(6), budget)
    assert (crashed.status, crashed.oom_phase) == ("oom", "train"), crashed.error
    # Under a CPU budget a thread's stack counts against RLIMIT_DATA: no thread, no memory.
    assert (no_thread.status, no_thread.oom_phase) == ("oom", "train"), no_thread.error
    assert "SIGSEGV" in crashed.error and "taken as out of memory" in crashed.error
    assert invalid.status == "error"  # a library's other failure, logged, is not an OOM for being budgeted
