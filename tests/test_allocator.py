"""Every child starts with an allocator that gives freed large blocks back, unless the user chose otherwise."""

import ctypes
import json
import os
import sys
from pathlib import Path

import pytest

from autobatch.errors import InvalidParameterError
from autobatch.process.child import allocator_environment, child_allocator_setting, memory_status, start_child

MIB = 2**20
BLOCK = 16 * MIB  # over glibc's first mmap threshold (128 KiB), under its dynamic ceiling (32 MiB)
GUARD = MIB // 2  # under the threshold a child starts with: from the heap in every case
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")


def kept_after_free(argument: str) -> int:
    """In a child: how much of a freed 16 MiB block the data segment still holds; prints it, with the variables."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # glibc's default maps the first block and, once it is freed, raises its threshold past it:
    # the second comes from the heap, and a block after it keeps the heap from shrinking. The
    # guard is larger than any hole the interpreter left in the heap, so it lands after the block.
    before = memory_status()["VmData"]
    libc.free(libc.malloc(BLOCK))
    second = libc.malloc(BLOCK)
    guard = libc.malloc(GUARD)
    libc.free(second)
    kept = memory_status()["VmData"] - before
    libc.free(guard)
    names = ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
    print(json.dumps({"kept": kept, "env": {name: os.environ.get(name) for name in names}}), flush=True)
    return 0


def run_child(tmp_path) -> dict:
    output = tmp_path / "child.log"
    with open(output, "wb") as handle:
        process = start_child("tests.test_allocator:kept_after_free", "", output=handle, pass_fds=())
        assert process.wait(timeout=60) == 0, output.read_text()
    return json.loads(output.read_text().splitlines()[-1])


@pytest.fixture
def clean_environment(monkeypatch):
    for name in (
        "AUTOBATCH_ALLOCATOR",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "GLIBC_TUNABLES",
        "LD_PRELOAD",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    return monkeypatch


def test_a_child_gives_a_freed_large_block_back(clean_environment, tmp_path):
    child = run_child(tmp_path)
    assert child["env"] == {"MALLOC_MMAP_THRESHOLD_": str(MIB), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert child["kept"] < 4 * MIB, child


def test_glibc_default_keeps_it_in_the_heap(clean_environment, tmp_path):
    # The control: what the setting prevents, so the test above can fail.
    clean_environment.setenv("AUTOBATCH_ALLOCATOR", "glibc-default")
    child = run_child(tmp_path)
    assert child["env"] == {"MALLOC_MMAP_THRESHOLD_": None, "GLIBC_TUNABLES": None}
    assert child["kept"] > BLOCK - MIB, child


def test_the_users_own_threshold_is_kept_and_in_effect(clean_environment, tmp_path):
    clean_environment.setenv("MALLOC_MMAP_THRESHOLD_", str(32 * MIB))  # above the block: it comes from the heap
    clean_environment.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    child = run_child(tmp_path)
    assert child["env"] == {
        "MALLOC_MMAP_THRESHOLD_": str(32 * MIB),
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
    }
    assert child["kept"] > BLOCK - MIB, child


@pytest.mark.parametrize(
    "environ, added",
    [
        ({}, {"MALLOC_MMAP_THRESHOLD_": str(MIB), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
        ({"MALLOC_MMAP_THRESHOLD_": "4096"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
            {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096:glibc.malloc.hugetlb=1"},
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"MALLOC_MMAP_THRESHOLD_": str(MIB)}),
        ({"AUTOBATCH_ALLOCATOR": "glibc-default"}, {}),
    ],
)
def test_what_the_user_chose_is_kept(environ, added):
    assert allocator_environment(environ) == added


def test_an_unknown_setting_is_one_clear_line():
    with pytest.raises(
        InvalidParameterError, match=r"AUTOBATCH_ALLOCATOR='jemalloc' .* fixed-threshold, glibc-default"
    ):
        allocator_environment({"AUTOBATCH_ALLOCATOR": "jemalloc"})


def test_a_trial_says_which_setting_it_was_measured_under(clean_environment):
    from autobatch import TrialBudget, TrialConfig, run_trial

    result = run_trial(
        "tests.synthetic_backend:workload",
        "tests.synthetic_backend:SyntheticBackend",
        TrialConfig(4),
        memory_budget="512MiB",
        budget=TrialBudget(train_samples=64),
    )
    assert result.status == "ok", result.error
    assert result.extras["allocator"] == f"MALLOC_MMAP_THRESHOLD_={MIB} GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
    assert child_allocator_setting() == result.extras["allocator"]  # what the parent's note can say
