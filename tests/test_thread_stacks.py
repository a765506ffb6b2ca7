"""Under a CPU budget a child's threads get a small stack, since RLIMIT_DATA counts each one whole, and
TensorFlow's CPU tensors come from malloc; what the user chose (``ulimit -s``, their own
``TF_ONEDNN_USE_SYSTEM_ALLOCATOR``, or ``AUTOBATCH_ALLOCATOR=glibc-default``) is kept."""

import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autobatch.process.child import THREAD_STACK_BYTES, child_setup, enter_child

MIB = 2**20
STOCK = 8 * MIB  # glibc's default thread stack where RLIMIT_STACK is Linux's own 8 MiB
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "pthread_setattr_default_np"),
    reason="glibc 2.18 or later",
)


def stack_of_a_new_thread(setup_json: str) -> int:
    """In a child: enter it as a trial child does, then print the stack size of a thread started after that."""
    enter_child(json.loads(setup_json))
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_ulong
    found = {}

    def measure() -> None:
        attr = ctypes.create_string_buffer(128)
        size = ctypes.c_size_t()
        if libc.pthread_getattr_np(ctypes.c_ulong(libc.pthread_self()), attr) == 0:
            libc.pthread_attr_getstacksize(attr, ctypes.byref(size))
            libc.pthread_attr_destroy(attr)
            found["bytes"] = size.value

    thread = threading.Thread(target=measure)  # no size of its own, as TensorFlow's and oneDNN's threads
    thread.start()
    thread.join()
    found["tensorflow_allocator"] = os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR")
    print(json.dumps(found), flush=True)
    return 0


def thread_stack_in_child(*, budget_bytes: int | None, stack_limit: int = STOCK, **environment: str) -> int:
    """The stack a new thread gets in a child entered with ``budget_bytes`` on the CPU, started under ``ulimit -s``."""
    return child_entered(budget_bytes=budget_bytes, stack_limit=stack_limit, **environment)["bytes"]


def child_entered(*, budget_bytes: int | None, stack_limit: int = STOCK, **environment: str) -> dict:
    """What a child entered with ``budget_bytes`` on the CPU, started under ``ulimit -s``, reports."""
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if hard != resource.RLIM_INFINITY and hard < stack_limit:
        pytest.skip(f"RLIMIT_STACK's hard limit is {hard} bytes")
    command = "import sys; from tests.test_thread_stacks import stack_of_a_new_thread as f; sys.exit(f(sys.argv[1]))"
    ours = ("AUTOBATCH_ALLOCATOR", "TF_ONEDNN_USE_SYSTEM_ALLOCATOR")
    env = {key: value for key, value in os.environ.items() if key not in ours}
    done = subprocess.run(
        [sys.executable, "-c", command, json.dumps(child_setup("cpu", budget_bytes))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, **environment},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_STACK, (stack_limit, hard)),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_child_under_a_cpu_budget_starts_threads_with_the_small_stack():
    assert THREAD_STACK_BYTES < STOCK
    assert thread_stack_in_child(budget_bytes=64 * 2**30) == THREAD_STACK_BYTES


def test_a_child_without_a_budget_keeps_glibcs_stack():
    assert thread_stack_in_child(budget_bytes=None) == STOCK


def test_the_users_ulimit_is_kept():
    assert thread_stack_in_child(budget_bytes=64 * 2**30, stack_limit=4 * MIB) == 4 * MIB


def test_glibc_default_keeps_glibcs_stack():
    assert thread_stack_in_child(budget_bytes=64 * 2**30, AUTOBATCH_ALLOCATOR="glibc-default") == STOCK


def test_tensorflow_takes_its_cpu_tensors_from_malloc_under_a_budget_unless_told_otherwise():
    assert child_entered(budget_bytes=64 * 2**30)["tensorflow_allocator"] == "1"
    assert child_entered(budget_bytes=None)["tensorflow_allocator"] is None
    assert child_entered(budget_bytes=64 * 2**30, AUTOBATCH_ALLOCATOR="glibc-default")["tensorflow_allocator"] is None
    assert child_entered(budget_bytes=64 * 2**30, TF_ONEDNN_USE_SYSTEM_ALLOCATOR="0")["tensorflow_allocator"] == "0"
