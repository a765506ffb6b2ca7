"""Statistical efficiency: the gradient noise scale, the goodput and time-to-target objectives, LR rules."""

import math
import statistics

import numpy as np
import pytest

from autobatch import InvalidParameterError, SearchSpace, TrialBudget, TrialConfig, load_workload, tune
from autobatch.core.noise import (
    MeasuringBudget,
    NoiseScaleEstimator,
    adascale_gain,
    pooled_noise_scale,
    statistical_efficiency,
)
from autobatch.search.space import scaled_learning_rate
from tests import efficiency_tasks as tasks

LINEAR = "tests.efficiency_tasks:linear_regression"
CURVES = dict(task="tests.efficiency_tasks:curve_workload", backend="tests.efficiency_tasks:CurveBackend")


# --- the estimator's arithmetic ---------------------------------------------------------------------


def test_two_batch_size_estimator_recovers_the_noise_scale_from_expected_norms():
    grad_sq, trace = 0.5, 20.0  # B_simple = 40
    estimator = NoiseScaleEstimator()
    for micro, accumulation in ((8, 4), (16, 2), (5, 8)):
        window = micro * accumulation
        estimator.add_window(micro, window, grad_sq + trace / micro, grad_sq + trace / window)
    assert estimator.grad_sq == pytest.approx(grad_sq) and estimator.trace == pytest.approx(trace)
    assert estimator.noise_scale == pytest.approx(40.0)
    estimator.add_window(8, 32, math.inf, 1.0)  # an overflowing mixed-precision step is left out
    summary = estimator.summary()
    assert summary["windows"] == 3 and summary["skipped_windows"] == 1
    assert summary["b_simple"] == pytest.approx(40.0)


def test_the_noise_scale_is_a_ratio_of_averages_and_unbounded_when_noise_swamps_the_gradient():
    # Two windows whose own ratios average to 25.5 but whose averages give 25.0.
    estimator = NoiseScaleEstimator()
    for grad_sq, trace in ((1.0, 1.0), (0.01, 0.5)):
        estimator.add_window(10, 20, grad_sq + trace / 10, grad_sq + trace / 20)
    assert estimator.noise_scale == pytest.approx(1.5 / 1.01)
    pooled = pooled_noise_scale(
        [
            {"grad_sq": 1.0, "trace": 10.0, "windows": 3, "b_simple": 10.0},
            {"grad_sq": 2.0, "trace": 100.0, "windows": 1, "b_simple": 50.0},
        ]
    )
    assert pooled["b_simple"] == pytest.approx(130 / 5) and pooled["per_trial_range"] == [10.0, 50.0]
    noisy = NoiseScaleEstimator()
    noisy.add_window(4, 16, 1.0, 1.1)  # the window's gradient is no smaller than its micro-batches'
    assert noisy.grad_sq > 0 and noisy.trace < 0 and noisy.noise_scale == 0.0
    noisy.add_window(4, 16, 10.0, 0.1)
    assert noisy.grad_sq < 0 and noisy.noise_scale is None


def test_windows_added_at_once_give_what_adding_them_one_by_one_gives():
    rng = np.random.default_rng(1)
    norms = rng.uniform(0.5, 2.0, size=(7, 2))
    one_by_one, at_once = NoiseScaleEstimator(), NoiseScaleEstimator()
    for micro_sq, window_sq in norms:
        one_by_one.add_window(8, 32, float(micro_sq), float(window_sq))
    one_by_one.add_window(8, 32, math.nan, 1.0)
    at_once.add_windows(8, 32, 7, 1, float(norms[:, 0].sum()), float(norms[:, 1].sum()))
    assert at_once.summary() == pytest.approx(one_by_one.summary(), rel=1e-12)
    at_once.add_windows(8, 32, 3, 0, math.inf, 1.0)  # an overflow in the sums: all three are left out
    assert at_once.windows == 7 and at_once.skipped_windows == 4


def test_measuring_budget_measures_to_its_share_of_the_time_and_shrugs_off_a_wait():
    budget = MeasuringBudget(share=0.01)
    measured = []
    for window in range(1002):
        due = budget.due()
        measured.append(due)
        cost = (30.0 if window == 2 else 0.05) if due else None  # 5 % of a 1 s window; preempted once
        budget.window_done(1.0 + (cost or 0.0), cost)
    assert measured[:3] == [True, True, True]  # the warm-up, then the first window counted
    assert 180 <= sum(measured[2:]) <= 220  # 1 % of the time at 5 % a window: one window in five
    cheap = MeasuringBudget(share=0.01)
    for _ in range(50):
        assert cheap.due()
        cheap.window_done(1.0, 0.001)  # a tenth of the share: every window


def test_efficiency_adascale_gain_and_the_learning_rate_rules():
    assert statistical_efficiency(100.0, 32, 32) == 1.0
    assert statistical_efficiency(100.0, 1000, 32) == pytest.approx(132 / 1100)
    assert statistical_efficiency(None, 1000, 32) == 1.0 == statistical_efficiency(math.inf, 1000, 32)
    # The gain runs from 1 (no noise: a larger batch buys nothing) to B/B_0 (noise-dominated: linear).
    assert adascale_gain(0.0, 512, 32) == pytest.approx(1.0)
    assert adascale_gain(math.inf, 512, 32) == pytest.approx(16.0)
    assert 1.0 < adascale_gain(100.0, 512, 32) < 16.0
    sgd = scaled_learning_rate(0.1, 32, 512, "adascale", 0.0, noise_scale=100.0, optimizer="sgd")
    adam = scaled_learning_rate(1e-3, 32, 512, "adascale", 0.0, noise_scale=100.0, optimizer="adam")
    assert sgd == pytest.approx(0.1 * adascale_gain(100.0, 512, 32))
    assert adam == pytest.approx(1e-3 * math.sqrt(adascale_gain(100.0, 512, 32)))
    assert scaled_learning_rate(0.1, 32, 512, "linear", 0.0) == pytest.approx(1.6)
    assert scaled_learning_rate(0.1, 32, 512, "sqrt", -1.0) == pytest.approx(0.04)
    with pytest.raises(InvalidParameterError, match="noise_scale"):
        scaled_learning_rate(0.1, 32, 512, "adascale", 0.0)
    assert SearchSpace(lr_rule="adascale").rule_for("adam") == "adascale"
    assert SearchSpace().rule_for("adam", "goodput") == "adascale"


# --- the trial loop's schedule (framework-free) ----------------------------------------------------


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run_fake_schedule(monkeypatch, budget, losses, prune_at=None, window_seconds=0.1):
    """run_schedule with a window that takes ``window_seconds`` of a fake clock; evaluations return ``losses``."""
    from autobatch.core import schedule as schedule_module
    from autobatch.core.windows import SteadyStateTimer

    clock = _FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    monkeypatch.setattr("autobatch.core.windows.time.perf_counter", clock)
    reports, trained = [], []

    def report(step, loss, seconds):
        reports.append((step, loss, round(seconds, 6)))
        return step == prune_at

    def feed(chunks):
        for windows in chunks:
            for window in windows:
                yield window, None

    def train(window, micro_batches, measure):
        clock.now += window_seconds
        trained.append((window.index, window.size, measure))
        return 1.0

    values = iter(losses)
    outcome = schedule_module.run_schedule(
        schedule_module.TrialSchedule(1000, 10, 2, budget),
        feed=feed,
        train=train,
        evaluate=lambda: next(values),
        progress=schedule_module.ReportingProgress(report),
        timer=SteadyStateTimer(budget.warmup_steps),
    )
    return outcome, reports, trained


def test_a_sample_budget_trains_its_samples_once_then_evaluates(monkeypatch):
    outcome, reports, trained = _run_fake_schedule(monkeypatch, TrialBudget(train_samples=95), [0.7])
    assert [size for _, size, _ in trained] == [20, 20, 20, 20, 15]  # the last window is short
    assert outcome.val_loss == 0.7 and outcome.samples_trained == 95 and not reports
    assert outcome.intermediate_losses == [] and not outcome.pruned


def test_a_time_budget_evaluates_at_even_points_reports_all_but_the_last_and_stops_when_pruned(monkeypatch):
    budget = TrialBudget(train_seconds=2.0, evaluations=4, warmup_steps=0, min_timed_steps=1)
    outcome, reports, trained = _run_fake_schedule(monkeypatch, budget, [0.9, 0.8, 0.7, 0.6])
    assert [step for step, *_ in reports] == [1, 2, 3]  # the last evaluation is the value, not a report
    assert [seconds for *_, seconds in reports] == pytest.approx([0.5, 1.0, 1.5])
    assert outcome.val_loss == 0.6 and len(trained) == 20 and not outcome.pruned
    assert [window for window, *_ in trained] == list(range(20))  # one stream, no window skipped
    assert all(size == 20 for _, size, _ in trained)

    outcome, reports, trained = _run_fake_schedule(monkeypatch, budget, [0.9, 0.8, 0.7, 0.6], prune_at=2)
    assert outcome.pruned and outcome.val_loss == 0.8 and len(trained) == 10
    assert [entry["step"] for entry in outcome.intermediate_losses] == [1, 2]

    outcome, reports, _ = _run_fake_schedule(monkeypatch, budget, [0.9, math.nan, 0.7, 0.6])
    assert math.isnan(outcome.val_loss) and len(reports) == 1 and not outcome.pruned  # diverged: stops, unasked


# --- the estimator in both frameworks ---------------------------------------------------------------


def test_torch_measures_each_micro_batch_gradient_and_the_window_gradient():
    torch = pytest.importorskip("torch")
    from autobatch.backends.torch import GradientNoiseMeter, supervised_loss, train_window
    from autobatch.backends.torch.training import make_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    loss_fn = make_loss("cross_entropy")

    def squared_norm(xb, yb):
        model.zero_grad()
        loss_fn(model(xb), yb).backward()
        return sum(float(p.grad.square().sum()) for p in model.parameters())

    micro = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    expected_micro = np.mean([squared_norm(xb, yb) for xb, yb in micro])
    expected_window = squared_norm(x, y)
    model.zero_grad(set_to_none=True)
    meter = GradientNoiseMeter(model.parameters())
    train_window(model, torch.optim.SGD(model.parameters(), lr=0.1), supervised_loss(loss_fn), micro, noise_meter=meter)
    [(micro_sq, window_sq)] = meter.window_norms()
    assert micro_sq == pytest.approx(expected_micro, rel=1e-9)
    assert window_sq == pytest.approx(expected_window, rel=1e-9)
    assert micro_sq > window_sq  # averaging four micro-batches cancels some noise
    assert not meter._handles  # a window trained without the meter pays for no hook

    # .grad holding zeros, not None: the first micro-batch goes through the hooks too, to the same norms.
    expected_micro = np.mean([squared_norm(xb, yb) for xb, yb in micro])
    expected_window = squared_norm(x, y)
    model.zero_grad(set_to_none=False)
    train_window(model, torch.optim.SGD(model.parameters(), lr=0.1), supervised_loss(loss_fn), micro, noise_meter=meter)
    meter.close()
    assert meter.window_norms()[1] == pytest.approx((expected_micro, expected_window), rel=1e-9)


def test_tensorflow_measures_each_micro_batch_gradient_and_the_window_gradient():
    tf = pytest.importorskip("tensorflow")
    import keras

    from autobatch.backends.tensorflow import MicroBatchTrainer, batch_spec
    from autobatch.backends.tensorflow.training import make_loss

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 6)).astype(np.float32), rng.integers(0, 3, 12).astype(np.int64)

    def squared_norm(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(make_loss("cross_entropy")(yb, model(xb, training=True)))
        return sum(float(tf.reduce_sum(tf.square(g))) for g in tape.gradient(loss, model.trainable_variables))

    micro = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    expected_micro = np.mean([squared_norm(xb, yb) for xb, yb in micro])
    expected_window = squared_norm(x, y)
    trainer = MicroBatchTrainer(
        model,
        keras.optimizers.SGD(0.1),
        "cross_entropy",
        x_spec=batch_spec(x),
        y_spec=batch_spec(y),
        measure_noise=True,
    )
    trainer.train_window(micro)
    micro_sq, window_sq = trainer.last_noise_norms()
    assert micro_sq == pytest.approx(expected_micro, rel=1e-5)
    assert window_sq == pytest.approx(expected_window, rel=1e-5)

    # Summed on the device over the windows of one micro-batch size, read once: as if added one by one.
    norms = [(micro_sq, window_sq)]
    trainer.train_window([(x[:6], y[:6]), (x[6:], y[6:])])
    norms.append(trainer.last_noise_norms())
    trainer.train_window([(x[:8], y[:8]), (x[8:], y[8:])])  # 8 and 4: not counted
    windows, skipped, micro_sum, window_sum = trainer.noise_totals()
    assert (windows, skipped) == (2, 0)
    assert (micro_sum, window_sum) == pytest.approx(tuple(np.sum(norms, axis=0)), rel=1e-6)

    # A window told not to measure trains the same and leaves the norms and their totals as they were,
    # through the same traced functions (the norms are a branch of them, not another trace).
    before = [v.numpy().copy() for v in model.trainable_variables]
    last = trainer.last_noise_norms()
    trainer.accumulate(x[:6], y[:6], 0.5, measure=False)
    trainer.finish(x[6:], y[6:], 0.5, measure=False, count_noise=True)
    assert trainer.last_noise_norms() == last
    assert trainer.noise_totals() == (windows, skipped, micro_sum, window_sum)
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables, strict=True))
    assert trainer.trace_counts == {"accumulate": 1, "apply": 1, "evaluate": 0}


@pytest.mark.slow
def test_noise_scale_of_linear_regression_is_within_20_percent_on_torch(monkeypatch):
    pytest.importorskip("torch")
    from autobatch import get_backend, load_workload
    from autobatch.backends.torch import backend as torch_backend
    from autobatch.core.progress import TrialProgress

    # Every window measured, so the estimate rests on the same 512 windows on any machine: how many a
    # trial measures is a matter of time (MeasuringBudget), and a slow machine's fewer windows made a
    # 20 % tolerance fail one run in a few. What the share does to a trial is tested above and below.
    monkeypatch.setattr(torch_backend, "MeasuringBudget", lambda: MeasuringBudget(share=1.0))
    backend = get_backend("torch")
    config, budget = TrialConfig(16, 4, tasks.FROZEN_LEARNING_RATE), TrialBudget(train_samples=2**15)
    measured = backend.run_trial(load_workload(LINEAR), config, budget, "cpu", TrialProgress())
    noise = measured.extras["gradient_noise"]
    assert noise["windows"] == 2**15 // 64 and noise["window_size"] == 64
    assert noise["b_simple"] == pytest.approx(tasks.TRUE_NOISE_SCALE, rel=0.2)


def test_a_tensorflow_trial_measures_the_noise_in_the_windows_its_budget_names(monkeypatch):
    pytest.importorskip("tensorflow")
    from autobatch.backends.base import TrialProgress
    from autobatch.backends.tensorflow import TensorFlowBackend
    from autobatch.backends.tensorflow import backend as tf_backend

    # Which windows is the budget's to say (tested above); here, every fourth: the trial measures and
    # counts those and no other, charges each what its norms cost (four micro-batches' and the window's,
    # timed in a traced call of their own), and what they measured reaches the result.
    charged = []

    class EveryFourth(MeasuringBudget):
        def due(self):
            return self.windows % 4 == 0

        def window_done(self, seconds, measuring_seconds=None):
            charged.append(measuring_seconds)
            super().window_done(seconds, measuring_seconds)

    monkeypatch.setattr(tf_backend, "MeasuringBudget", EveryFourth)
    measured = TensorFlowBackend().run_trial(
        load_workload(LINEAR),
        TrialConfig(16, 4, tasks.FROZEN_LEARNING_RATE),
        TrialBudget(train_samples=2**14),
        "cpu",
        TrialProgress(),
    )
    noise = measured.extras["gradient_noise"]
    assert len(charged) == 256 and [c is not None for c in charged[:5]] == [True, False, False, False, True]
    costs = {c for c in charged if c is not None}
    assert len(costs) == 1 and 0 < costs.pop() < 0.05  # one timing, five passes of the norms: milliseconds
    assert noise["windows"] == 64 and noise["window_size"] == 64
    assert noise["b_simple"] == pytest.approx(tasks.TRUE_NOISE_SCALE, rel=0.5)
    assert measured.extras["traces"] == {"accumulate": 1, "apply": 1, "evaluate": 1}


@pytest.mark.slow
def test_a_trial_measures_the_noise_in_a_share_of_its_windows_and_pruning_reaches_the_trial():
    pytest.importorskip("torch")
    from autobatch.process.worker import TrialWorker

    with TrialWorker(LINEAR, "torch", memory_budget="1GiB", device="cpu") as worker:
        # Hooks cost this one-weight model a sixth to a third of its window: the trial measures one window
        # in thirty to seventy (MeasuringBudget: 0.5 % of its time), and what it measured reaches the result.
        result = worker.run(TrialConfig(16, 4, tasks.FROZEN_LEARNING_RATE), TrialBudget(train_samples=2**16))
        assert result.status == "ok", result.error
        assert 4 <= result.gradient_noise["windows"] < 1024 and result.gradient_noise["window_size"] == 64
        # The estimate's parts reach the result; its accuracy is the test above's (with a few windows
        # |G|² may not resolve, and the noise scale is then None)
        noise = result.gradient_noise
        assert math.isfinite(noise["grad_sq"]) and math.isfinite(noise["trace"]) and noise["trace"] != 0
        assert result.noise_scale == noise["b_simple"]

        # No accumulation, no second batch size: nothing to estimate.
        single = worker.run(TrialConfig(64, 1, tasks.FROZEN_LEARNING_RATE), TrialBudget(train_samples=1024))
        assert single.noise_scale is None and single.gradient_noise == {}

        # A time-budgeted trial asks after each evaluation but the last; "prune" stops it there.
        asked = []

        def prune_at_second(step, val_loss, train_seconds):
            asked.append((step, val_loss, train_seconds))
            return step == 2

        budget = TrialBudget(train_seconds=0.4, evaluations=4)
        pruned = worker.run(TrialConfig(16, 2, 0.01), budget, on_report=prune_at_second)
        assert pruned.status == "ok" and pruned.pruned
        assert [step for step, *_ in asked] == [1, 2]
        assert [entry["val_loss"] for entry in pruned.intermediate_losses] == [loss for _, loss, _ in asked]
        assert pruned.val_loss == asked[-1][1] and 0.2 <= asked[-1][2] < 0.4
        full = worker.run(TrialConfig(16, 2, 0.01), budget)  # nobody prunes: all four evaluations
        assert not full.pruned and len(full.intermediate_losses) == 4
        assert (
            full.intermediate_losses[-1]["train_seconds"] >= 0.4
            and full.val_loss == full.intermediate_losses[-1]["val_loss"]
        )


def test_noise_scale_of_linear_regression_is_within_20_percent_on_tensorflow(monkeypatch):
    pytest.importorskip("tensorflow")
    from autobatch.backends.base import TrialProgress
    from autobatch.backends.tensorflow import TensorFlowBackend
    from autobatch.backends.tensorflow import backend as tf_backend

    # Every window measured, so that the estimate rests on the same 128 windows on any machine: a trial
    # measures what its MeasuringBudget allows, and this one-weight model's norms cost about its window.
    class EveryWindow(MeasuringBudget):
        def due(self):
            return True

    monkeypatch.setattr(tf_backend, "MeasuringBudget", EveryWindow)
    measured = TensorFlowBackend().run_trial(
        load_workload(LINEAR),
        TrialConfig(16, 4, tasks.FROZEN_LEARNING_RATE),
        TrialBudget(train_samples=8192),
        "cpu",
        TrialProgress(),
    )
    noise = measured.extras["gradient_noise"]
    assert noise["b_simple"] == pytest.approx(tasks.TRUE_NOISE_SCALE, rel=0.2)
    assert noise["windows"] == 128


# --- objectives in studies -------------------------------------------------------------------------


@pytest.mark.slow
def test_time_to_target_prunes_a_third_and_recommends_no_worse_than_pareto_within_the_budget(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from autobatch.process.worker import TrialWorker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per trial: steadier wall-clock on a shared machine
    task = "tests.efficiency_tasks:blobs"
    budget = TrialBudget(train_seconds=0.6, evaluations=4)
    common = dict(
        memory_budget="2GiB",
        n_trials=10,
        device="cpu",
        storage=f"journal:///{tmp_path}/studies.log",
        search_space=SearchSpace(min_micro_batch=8, max_accumulation=4),
    )
    timed = tune(task, "torch", study_name="ttt", objective="time-to-target", trial_budget=budget, **common)
    assert timed.n_pruned_trials >= timed.n_trials / 3
    pruned = [t for t in timed.study.trials if t.state.name == "PRUNED"]
    assert all(t.user_attrs["pruned"] and max(t.intermediate_values) < 4 for t in pruned)
    pareto = tune(task, "torch", study_name="pareto", objective="pareto", max_trial_samples=1024, **common)

    # Both recommendations trained again under the same time budget, alternately, three times each.
    losses = {"time-to-target": [], "pareto": []}
    configs = {name: result.recommended for name, result in (("time-to-target", timed), ("pareto", pareto))}
    with TrialWorker(task, "torch", memory_budget="2GiB", device="cpu") as worker:
        for round_ in range(3):
            for name in sorted(configs, reverse=bool(round_ % 2)):
                rec = configs[name]
                config = TrialConfig(rec["micro_batch_size"], rec["accumulation_steps"], rec["learning_rate"])
                losses[name].append(worker.run(config, budget).val_loss)
    # No worse, to within the 2% that the studies' own loss tolerance grants measurement noise.
    assert statistics.median(losses["time-to-target"]) <= statistics.median(losses["pareto"]) * 1.02, losses


@pytest.mark.slow
def test_hyperband_prunes_closed_form_curves_and_recommends_the_best_finisher(tmp_path):
    seconds = 2.0
    result = tune(
        **CURVES,
        memory_budget="256MiB",
        n_trials=12,
        device="cpu",
        storage=f"journal:///{tmp_path}/s.log",
        objective="time-to-target",
        pruner="hyperband",
        trial_budget=TrialBudget(train_seconds=seconds, evaluations=4),
    )
    study = result.study
    assert type(study.pruner).__name__ == "HyperbandPruner"
    assert result.n_pruned_trials >= 4 and study.metric_names == ["validation loss within the time budget"]
    finished = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["feasible"]]
    for trial in finished:
        attrs = trial.user_attrs
        expected = tasks.curve_loss_within(
            attrs["micro_batch_size"], attrs["accumulation_steps"], attrs["learning_rate"], seconds
        )
        assert trial.values[0] == pytest.approx(expected)
        assert sorted(trial.intermediate_values) == [1, 2, 3]  # the last evaluation is the value, not a report
    rec = result.recommended
    assert rec["val_loss"] == min(t.values[0] for t in finished)
    from optuna_dashboard import get_note

    note = get_note(study)
    assert "time-to-target" in note and f"{result.n_pruned_trials} pruned" in note


@pytest.mark.slow
def test_goodput_ranks_by_throughput_times_efficiency_at_the_rules_learning_rate(tmp_path):
    result = tune(
        **CURVES,
        memory_budget="256MiB",
        n_trials=8,
        device="cpu",
        storage=f"journal:///{tmp_path}/s.log",
        objective="goodput",
    )
    study = result.study
    # The noise probe (micro-batch 32 x 4) measured B_simple on the data: near the closed form's 41.
    probe = study.user_attrs["autobatch_noise"]
    measured = probe["b_simple"]
    assert measured == pytest.approx(tasks.TRUE_NOISE_SCALE, rel=0.1)
    assert probe["windows"] == 16384 // (32 * 4) and probe["accumulation_steps"] == 4
    assert study.user_attrs["autobatch"]["lr_rule"] == "adascale"
    feasible = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["feasible"]]
    assert feasible
    for trial in feasible:
        micro, accumulation = trial.user_attrs["micro_batch_size"], trial.user_attrs["accumulation_steps"]
        batch = micro * accumulation
        efficiency = (measured + 32) / (measured + batch)  # with the measured B_noise, not the curves' own
        assert trial.values[0] == pytest.approx(tasks.curve_throughput(micro, accumulation) * efficiency)
        assert "lr_offset_decades" not in trial.params  # goodput cannot rank learning rates: the rule sets it
        assert trial.user_attrs["learning_rate"] == pytest.approx(
            scaled_learning_rate(1e-3, 32, batch, "adascale", 0.0, noise_scale=measured, optimizer="adam")
        )
    best = max(feasible, key=lambda t: t.values[0])
    assert result.recommended["trial_number"] == best.number
    assert result.recommended["goodput"] == pytest.approx(best.values[0])
    # The study's estimate pools the probe and the trials that accumulated: all near 41.
    assert result.noise_scale["b_simple"] == pytest.approx(tasks.TRUE_NOISE_SCALE, rel=0.1)
    assert result.noise_scale["probe"] == measured
    from optuna_dashboard import get_note

    assert f"critical batch size B_simple ≈ **{result.noise_scale['b_simple']:.0f}**" in get_note(study)


# --- bad input -------------------------------------------------------------------------------------


def test_objective_settings_are_checked_before_anything_is_written(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    cases = [
        (dict(objective="fastest"), "objective='fastest' is invalid: must be one of"),
        (dict(objective="time-to-target"), "train_seconds=None is invalid: objective='time-to-target'"),
        (dict(objective="goodput", search_space=SearchSpace(lr_rule="absolute")), "lr_rule='absolute' is invalid"),
        (dict(objective="time-to-target", pruner="median"), "pruner='median' is invalid"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(")):
            tune(**CURVES, memory_budget="256MiB", n_trials=2, storage=url, device="cpu", **kwargs)
    assert not (tmp_path / "s.db").exists()
    with pytest.raises(InvalidParameterError, match="train_seconds=0 is invalid"):
        TrialBudget(train_seconds=0)
    with pytest.raises(InvalidParameterError, match="evaluations=0 is invalid"):
        TrialBudget(train_seconds=5, evaluations=0)


def test_cli_names_the_objective_options(run_cli, tmp_path):
    storage = f"sqlite:///{tmp_path}/x.db"
    done = run_cli("tune", "digits-mlp", "--objective", "fastest", "--storage", storage)
    assert done.returncode == 2 and "--objective" in done.stderr and "time-to-target" in done.stderr
    done = run_cli("tune", "digits-mlp", "--objective", "time-to-target", "--storage", storage)
    assert done.returncode == 2 and "--train-seconds" in done.stderr
    done = run_cli("tune", "digits-mlp", "--objective", "time-to-target", "--train-seconds", "-1", "--storage", storage)
    assert done.returncode == 2 and "--train-seconds=-1.0 is invalid" in done.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_pruned_trials_count_toward_the_trial_goal_of_local_workers(tmp_path):
    # With two workers the goal is counted in the storage: a pruned trial ran and was judged, so it
    # counts, as in Optuna's own n_trials; otherwise the workers would run on until 6 had completed.
    result = tune(
        **CURVES,
        memory_budget="256MiB",
        n_trials=6,
        n_workers=2,
        device="cpu",
        storage=f"sqlite:///{tmp_path}/s.db",
        objective="time-to-target",
        trial_budget=TrialBudget(train_seconds=1.0, evaluations=4),
    )
    states = [t.state.name for t in result.study.trials]
    assert len(states) == 6 and "RUNNING" not in states, states
    assert states.count("PRUNED") >= 1 and result.n_pruned_trials == states.count("PRUNED"), states
