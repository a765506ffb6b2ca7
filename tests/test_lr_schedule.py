"""Learning-rate schedules: the multipliers, the spellings, and the rate trials and ``autobatch train`` really use.

The schedule is applied over each trial's own length (its samples, or its training seconds) and
over a training run's planned windows; the constant default must leave a trial exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from autobatch import (
    InvalidParameterError,
    KerasTask,
    LearningRateSchedule,
    TorchTask,
    TrialBudget,
    TrialConfig,
    Workload,
    load_workload,
)
from autobatch.backends._trial import ScheduledLearningRate
from autobatch.core.lr_schedule import WARMUP_COSINE_SHARE
from autobatch.core.windows import Window


def halving(progress: float) -> float:
    """A user's schedule: the rate halves at half the run."""
    return 1.0 if progress < 0.5 else 0.5


# -- the multipliers and the spellings --------------------------------------------------------------------------


def test_constant_is_one_throughout_after_its_linear_warm_up():
    assert all(LearningRateSchedule().multiplier(p) == 1.0 for p in (0.0, 0.3, 1.0))
    warm = LearningRateSchedule("constant", warmup=0.2)
    assert [warm.multiplier(p) for p in (0.0, 0.05, 0.1, 0.2, 0.7, 1.0)] == pytest.approx([0, 0.25, 0.5, 1, 1, 1])
    assert LearningRateSchedule().is_constant and not warm.is_constant


def test_cosine_reaches_one_after_warm_up_and_final_at_the_end():
    schedule = LearningRateSchedule("cosine", warmup=0.1, final=0.2)
    assert schedule.multiplier(0.05) == pytest.approx(0.5)  # halfway up the warm-up
    assert schedule.multiplier(0.1) == pytest.approx(1.0)
    assert schedule.multiplier(0.55) == pytest.approx(0.6)  # halfway down: (1 + final) / 2
    assert schedule.multiplier(1.0) == pytest.approx(0.2)
    assert schedule.multiplier(7.0) == pytest.approx(0.2)  # clipped to the run
    decay = [schedule.multiplier(p) for p in np.linspace(0.1, 1.0, 20)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert LearningRateSchedule("cosine").multiplier(0.0) == 1.0  # no warm-up: the full rate at once


def test_a_callable_is_the_whole_schedule():
    schedule = LearningRateSchedule.parse(halving)
    assert [schedule.multiplier(p) for p in (0.0, 0.49, 0.5, 1.0)] == [1.0, 1.0, 0.5, 0.5]
    assert str(schedule) == "tests.test_lr_schedule:halving" and not schedule.is_constant


@pytest.mark.parametrize(
    "spelling, expected",
    [
        (None, LearningRateSchedule()),
        ("constant", LearningRateSchedule()),
        ("Cosine", LearningRateSchedule("cosine")),
        ("warmup-cosine", LearningRateSchedule("cosine", warmup=WARMUP_COSINE_SHARE)),
        ("cosine:0.1", LearningRateSchedule("cosine", warmup=0.1)),
        ("cosine:0.1:0.01", LearningRateSchedule("cosine", warmup=0.1, final=0.01)),
        ("constant:0.05", LearningRateSchedule("constant", warmup=0.05)),
        (LearningRateSchedule("cosine", final=0.5), LearningRateSchedule("cosine", final=0.5)),
    ],
)
def test_parse_accepts_every_spelling_and_reads_its_own_back(spelling, expected):
    schedule = LearningRateSchedule.parse(spelling)
    assert schedule == expected
    assert LearningRateSchedule.parse(str(schedule)) == schedule


@pytest.mark.parametrize(
    "value, says",
    [
        ("linear", "must be None, 'constant', 'cosine'"),
        ("cosine:1.5", "WARMUP (1.5 here) must lie in [0, 1)"),
        ("cosine:0.1:-1", "FINAL (-1.0 here) must lie in [0, 1]"),
        ("cosine:nan", "WARMUP"),
        ("constant:0.1:0.5", "must be None"),
        ("cosine:x", "must be None"),
        ("warmup-cosine:0.1", "must be None"),
        (3, "must be None"),
        (lambda progress: -1.0, "must return a finite multiplier >= 0; gave -1.0 at progress 0.0"),
        (lambda progress: math.inf if progress == 1 else 1.0, "gave inf at progress 1.0"),
        (lambda progress: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_bad_input_is_one_line_naming_lr_schedule_and_the_value(value, says):
    with pytest.raises(InvalidParameterError) as raised:
        LearningRateSchedule.parse(value)
    message = str(raised.value)
    assert message.startswith("lr_schedule=") and "\n" not in message and says in message
    assert repr(value) in message or "<lambda>" in message  # the value as given; a callable by its name


def test_tasks_parse_their_schedule_once_and_refuse_a_bad_one():
    x, y = np.zeros((8, 2), np.float32), np.zeros(8, np.int64)
    workload = Workload("w", x, y, x, y, models={}, lr_schedule="warmup-cosine")
    assert workload.lr_schedule == LearningRateSchedule("cosine", warmup=WARMUP_COSINE_SHARE)
    assert Workload("w", x, y, x, y, models={}).lr_schedule is None
    assert (
        TorchTask(model=list, train_data=(x, y), val_data=(x, y), lr_schedule=halving).lr_schedule.function is halving
    )
    for make in (
        lambda: Workload("w", x, y, x, y, models={}, lr_schedule="step"),
        lambda: TorchTask(model=list, train_data=(x, y), val_data=(x, y), lr_schedule="step"),
        lambda: KerasTask(model=list, train_data=(x, y), val_data=(x, y), lr_schedule="step"),
    ):
        with pytest.raises(InvalidParameterError, match=r"^lr_schedule='step' is invalid"):
            make()


# -- the template: progress over the trial's own length ---------------------------------------------------------


class _RecordingTrial:
    def __init__(self):
        self.multipliers: list[float] = []

    def scale_learning_rate(self, multiplier):
        self.multipliers.append(multiplier)

    def train_window(self, window, micro_batches, measure):
        return 0.0


def _window(size: int) -> Window:
    return Window(0, (np.arange(size),))


def test_a_sample_budget_is_the_trials_length_and_timing_windows_train_at_its_end():
    trial = _RecordingTrial()
    scheduled = ScheduledLearningRate(trial, LearningRateSchedule("cosine"), TrialBudget(train_samples=128))
    for measure in (True, True, True, True, False):
        scheduled.train_window(_window(32), None, measure)
    expected = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    # The first window's 1.0 is set too: the optimizer's rate might not be the config's (a resumed one).
    assert trial.multipliers == pytest.approx([*expected, 0.0])
    assert scheduled.extras() == {"lr_schedule": "cosine", "final_lr_multiplier": 0.0}


def test_a_time_budget_counts_training_seconds_and_leaves_evaluation_out(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("autobatch.backends._trial.time.perf_counter", lambda: clock[0])
    trial = _RecordingTrial()
    budget = TrialBudget(train_seconds=10.0)
    scheduled = ScheduledLearningRate(trial, LearningRateSchedule("constant", warmup=0.5), budget)

    def evaluate():
        clock[0] += 100.0  # a long evaluation: not training time
        return 1.0

    timed_evaluate = scheduled.evaluating(evaluate)
    clock[0] += 1.0
    scheduled.train_window(_window(4), None, True)  # 1 s of 10 trained: 10 % of a 50 % warm-up
    timed_evaluate()
    clock[0] += 1.5
    scheduled.train_window(_window(4), None, True)  # 2.5 s
    clock[0] += 20.0
    scheduled.train_window(_window(4), None, True)  # past the budget: the end
    assert trial.multipliers == pytest.approx([0.2, 0.5, 1.0])


# -- real trials: the rate at the end, the loss it gives, and the constant default unchanged -------------------

_BUDGET = TrialBudget(train_samples=128, seed=3)  # 2 windows of 64, then 2 for timing alone at the end
_CONFIG = TrialConfig(32, 2, 3e-3)


def _keeping(backend_class):
    class Keeping(backend_class):
        def start_trial(self, *args):
            self.trial = super().start_trial(*args)
            return self.trial

    return Keeping()


def _trials(backend, workload) -> dict:
    from autobatch.backends.base import TrialProgress

    tasks = {
        "none": workload,
        "constant": dataclasses.replace(workload, lr_schedule="constant"),
        "cosine": dataclasses.replace(workload, lr_schedule="cosine:0:0.1"),
    }
    return {
        name: (backend.run_trial(task, _CONFIG, _BUDGET, "cpu", TrialProgress()), backend.trial)
        for name, task in tasks.items()
    }


def _check(results: dict, final_rate) -> None:
    (none, _), (constant, _), (cosine, cosine_trial) = results["none"], results["constant"], results["cosine"]
    assert constant.val_loss == none.val_loss and constant.extras.keys() == none.extras.keys()
    assert "lr_schedule" not in none.extras
    assert cosine.extras["lr_schedule"] == "cosine:0:0.1" and cosine.extras["final_lr_multiplier"] == pytest.approx(0.1)
    assert final_rate(cosine_trial) == pytest.approx(0.1 * _CONFIG.learning_rate)
    assert cosine.val_loss != none.val_loss  # the second window trained at 55 % of the rate


def test_a_torch_trial_follows_the_schedule_and_the_constant_one_is_unchanged():
    pytest.importorskip("torch")
    from autobatch.backends.torch import TorchBackend

    results = _trials(_keeping(TorchBackend), load_workload("digits-mlp"))
    _check(results, lambda trial: trial.optimizer.param_groups[0]["lr"])


def test_a_keras_trial_follows_the_schedule_without_tracing_its_step_again():
    pytest.importorskip("tensorflow")
    from autobatch.backends.tensorflow.backend import TensorFlowBackend

    results = _trials(_keeping(TensorFlowBackend), load_workload("digits-mlp"))
    _check(results, lambda trial: float(trial.trainer.optimizer.learning_rate.numpy()))
    assert results["cosine"][0].extras["traces"] == {"accumulate": 1, "apply": 1, "evaluate": 1}


def test_torch_parameter_groups_keep_their_ratio():
    torch = pytest.importorskip("torch")
    from autobatch.backends.torch.accumulate import LearningRateScaler

    head, body = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": body.parameters()}, {"params": head.parameters(), "lr": 1.0}], lr=0.1)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1)  # a tensor rate stays the same tensor
    tensor = optimizer.param_groups[0]["lr"]
    scaler = LearningRateScaler(optimizer)
    scaler.scale(0.5)
    assert optimizer.param_groups[0]["lr"] is tensor and float(tensor) == pytest.approx(0.05)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5)


def test_a_loss_scaled_keras_optimizer_takes_the_rate_in_its_inner_optimizer():
    pytest.importorskip("tensorflow")
    from autobatch.backends.tensorflow._framework import keras
    from autobatch.backends.tensorflow.accumulate import MicroBatchTrainer

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    trainer = MicroBatchTrainer(model, optimizer, "cross_entropy")
    x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int64)
    trainer.train_window([(x, y)])
    trainer.set_learning_rate(0.025)
    trainer.train_window([(x, y)])
    assert float(optimizer.inner_optimizer.learning_rate.numpy()) == pytest.approx(0.025)
    assert trainer.trace_counts["apply"] == 1


# -- autobatch train: the schedule over the whole run, resumed where it was ---------------------------------------


def crashing_cosine():
    """tests.adaptive_tasks's ``crashing`` task with a cosine schedule ending at 0.2."""
    from tests import adaptive_tasks

    return dataclasses.replace(adaptive_tasks.crashing(), lr_schedule="cosine:0:0.2")


def test_a_training_run_follows_the_schedule_over_its_windows_and_a_resumed_one_continues_it(tmp_path):
    # As tests/test_adaptive.py's crash test: step 4 dies at 16 and the new process loads the checkpoint
    # written after step 2, replays step 3 and redoes step 4 at 8; the rates must be the same as unbroken.
    from autobatch.training.api import train

    task = "tests.test_lr_schedule:crashing_cosine"
    reference = train(task, "torch", micro_batch_size=8, accumulation_steps=4, seed=6, output=tmp_path / "small.npz")
    events: list[dict] = []
    adapted = train(
        task,
        "torch",
        micro_batch_size=16,
        accumulation_steps=2,
        seed=6,
        adaptive=True,
        grow_after=None,
        checkpoint_every=2,
        output=tmp_path / "adapted.npz",
        on_event=events.append,
    )
    assert adapted.restarts == 1 and reference.steps == adapted.steps == 6
    schedule = LearningRateSchedule("cosine", final=0.2)
    rates = {event["step"]: event["lr_multiplier"] for event in events if event["event"] == "window"}
    assert rates == pytest.approx({step: schedule.multiplier((step - 1) / 6) for step in range(1, 7)})
    with np.load(tmp_path / "small.npz") as small, np.load(tmp_path / "adapted.npz") as big:
        for name in small.files:
            np.testing.assert_allclose(big[name], small[name], rtol=1e-5, atol=1e-6, err_msg=name)
