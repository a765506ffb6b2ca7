import json
import subprocess
import sys

import numpy as np
import pytest

from autobatch import InvalidParameterError, MemoryBudget, TrialBudget, TrialConfig, TrialResult
from autobatch.core.registry import backend_names, backend_path
from autobatch.core.windows import SampleStream, plan_windows
from autobatch.errors import BackendNotFoundError, TaskLoadError
from autobatch.tasks.loading import load_workload


def test_importing_autobatch_imports_no_framework():
    code = (
        "import sys, autobatch, autobatch.backends, autobatch.studies, autobatch.cli;"
        "import autobatch.process.worker, autobatch.tasks.workload;"
        "print([m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "text, expected",
    [("1.5GiB", int(1.5 * 2**30)), ("800MB", 800_000_000), ("512mib", 512 * 2**20), ("1024", 1024), (2048, 2048)],
)
def test_memory_budget_parses_sizes(text, expected):
    assert MemoryBudget.parse(text).resolve("cpu") == expected


def test_memory_budget_share_of_available_ram():
    import psutil

    budget = MemoryBudget.parse("50%")
    assert budget.fraction == 0.5
    available = psutil.virtual_memory().available
    assert abs(budget.resolve("cpu") - available / 2) < 0.05 * available


@pytest.mark.parametrize("text", ["lots", "", "-1GiB", "0", "150%", "1.5 parsecs", True, None])
def test_memory_budget_rejects_nonsense(text):
    with pytest.raises(InvalidParameterError) as info:
        MemoryBudget.parse(text)
    assert "memory_budget" in str(info.value)
    assert repr(text) in str(info.value)


def test_trial_config_derives_effective_batch_and_round_trips():
    config = TrialConfig(micro_batch_size=16, accumulation_steps=4, learning_rate=3e-4)
    assert config.effective_batch_size == 64
    assert TrialConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"micro_batch_size": 2.5}, "micro_batch_size"),
        ({"micro_batch_size": 4, "accumulation_steps": 0}, "accumulation_steps"),
        ({"micro_batch_size": 4, "learning_rate": -1.0}, "learning_rate"),
        ({"micro_batch_size": 4, "learning_rate": float("nan")}, "learning_rate"),
    ],
)
def test_trial_config_names_the_bad_parameter(kwargs, parameter):
    with pytest.raises(InvalidParameterError) as info:
        TrialConfig(**kwargs)
    assert info.value.parameter == parameter


def test_trial_budget_and_result_validate():
    with pytest.raises(InvalidParameterError, match="train_samples"):
        TrialBudget(train_samples=0)
    with pytest.raises(InvalidParameterError, match="status"):
        TrialResult(status="fine", config=TrialConfig(1))
    result = TrialResult(status="oom", config=TrialConfig(8, 2), oom_phase="eval", peak_memory_bytes=10)
    assert TrialResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_windows_cover_the_budget_once_with_a_short_last_micro_batch():
    stream = SampleStream(100, seed=3)
    windows = list(plan_windows(stream, total_samples=250, micro_batch_size=8, accumulation_steps=4))
    assert [w.size for w in windows] == [32] * 7 + [26]
    assert [len(mb) for mb in windows[-1].micro_batches] == [8, 8, 8, 2]
    assert windows[-1].weights() == pytest.approx([8 / 26, 8 / 26, 8 / 26, 2 / 26])
    seen = np.concatenate([mb for w in windows for mb in w.micro_batches])
    # 2.5 epochs: the first two epochs are permutations of all samples.
    assert sorted(seen[:100]) == list(range(100)) and sorted(seen[100:200]) == list(range(100))


def test_same_seed_same_order_across_streams():
    a = np.concatenate([mb for w in plan_windows(SampleStream(50, 1), 120, 5, 2) for mb in w.micro_batches])
    b = np.concatenate([mb for w in plan_windows(SampleStream(50, 1), 120, 10, 3) for mb in w.micro_batches])
    assert np.array_equal(a, b)  # the order of samples does not depend on the config


def test_registry_finds_backends_through_entry_points():
    assert {"torch", "tensorflow"} <= set(backend_names())
    assert backend_path("torch") == "autobatch.backends.torch:TorchBackend"
    with pytest.raises(BackendNotFoundError, match="jax"):
        backend_path("jax")


def test_task_names_and_paths():
    assert load_workload("digits-mlp").x_train.shape[1] == 64
    with pytest.raises(TaskLoadError, match="no study of that name"):
        load_workload("digits-xl")
    with pytest.raises(TaskLoadError, match="cannot import module"):
        load_workload("no_such_package.tasks:factory")
    with pytest.raises(TaskLoadError, match="raised ValueError: no data here"):
        load_workload("tests.tasks:factory_raises")


def test_studies_share_one_stratified_split():
    digits = load_workload("digits-mlp")
    cnn = load_workload("digits-cnn")
    assert np.array_equal(digits.y_val, cnn.y_val)
    assert cnn.x_train.shape[1:] == (1, 8, 8)
    counts = np.bincount(digits.y_val) / len(digits.y_val)
    assert counts.min() > 0.08  # every class is in the validation split in proportion
    images = load_workload("synthetic-images")
    assert images.x_train.dtype == np.uint8 and images.x_train.shape[1:] == (3, 64, 64)
    assert images.x_train.nbytes < 64 * 2**20  # the budget goes to activations, not data


def test_timer_leaves_out_a_pause_only_when_timed_windows_follow(monkeypatch):
    from autobatch.core import windows

    clock = iter([0.0, 1.0, 2.0, 3.0, 3.0, 13.0, 14.0])
    monkeypatch.setattr(windows.time, "perf_counter", lambda: next(clock))
    timer = windows.SteadyStateTimer(warmup_windows=1)  # created at 0
    timer.window_done(10)  # 1: warm-up ends
    timer.window_done(10)  # 2
    timer.window_done(10)  # 3
    assert timer.samples_per_second == pytest.approx(20 / 2)
    timer.pause()  # 3
    timer.resume()  # 13: ten seconds of evaluation
    assert timer.samples_per_second == pytest.approx(20 / 2)  # nothing timed after it yet
    timer.window_done(10)  # 14
    assert timer.samples_per_second == pytest.approx(30 / 3)
