"""The study: probe, joint search, constraint, recommendation, storage, and its CLI."""

import json
import math
import sqlite3

import numpy as np
import pytest

from autobatch import InvalidParameterError, SearchSpace, TrialConfig, TrialResult, tune
from autobatch.errors import StorageError
from autobatch.process.worker import TrialWorker
from autobatch.search.probe import PROBE_TIMEOUT_FLOOR, ProbeError, find_memory_wall, probe_timeout
from tests import synthetic_backend as synthetic

SYNTHETIC = dict(task="tests.synthetic_backend:workload", backend="tests.synthetic_backend:SyntheticBackend")
MIB = 2**20


def _affine_runner(intercept, per_sample, calls):
    """A probe runner whose peak is exactly affine, with a hard wall at the cap it is given."""

    def run(micro_batch):
        calls.append(micro_batch)
        peak = intercept + per_sample * micro_batch
        status = "ok" if peak <= run.cap else "oom"
        return TrialResult(status=status, config=TrialConfig(micro_batch), peak_memory_bytes=min(peak, run.cap))

    return run


@pytest.mark.parametrize("intercept, per_sample", [(300 * MIB, 2.3 * MIB), (100 * MIB, 40_000), (900 * MIB, 7 * MIB)])
def test_probe_finds_the_wall_within_3_percent_in_few_probes(intercept, per_sample):
    budget, margin = 1024 * MIB, 0.05
    calls = []
    runner = _affine_runner(intercept, per_sample, calls)
    runner.cap = budget * (1 - margin)
    truth = math.floor((budget * (1 - margin) - intercept) / per_sample)
    probe = find_memory_wall(runner, budget, safety_margin=margin)
    assert truth * 0.97 <= probe.max_micro_batch <= truth
    assert len(calls) <= 8
    assert probe.memory_model.bytes_per_sample == pytest.approx(per_sample, rel=0.05)


def test_probe_grows_step_by_step_while_small_probes_read_mostly_fixed_memory():
    # A runtime's pools cover the first 64 samples' activations (0.1 MiB each as read), past
    # them each sample costs 2 MiB: probes at 4 and 32 put the wall near 6,700, the truth is 397.
    calls = []

    def run(micro_batch):
        calls.append(micro_batch)
        peak = 300 * MIB + 0.1 * MIB * min(micro_batch, 64) + 2 * MIB * max(0, micro_batch - 64)
        status = "ok" if peak <= 0.95 * 1024 * MIB else "oom"
        return TrialResult(status=status, config=TrialConfig(micro_batch), peak_memory_bytes=int(peak))

    probe = find_memory_wall(run, 1024 * MIB, safety_margin=0.05)
    truth = 64 + math.floor((0.95 * 1024 - 300 - 6.4) / 2)
    assert truth * 0.97 <= probe.max_micro_batch <= truth
    first_miss = next(i for i, m in enumerate(calls) if run(m).status == "oom")
    assert all(calls[i] <= 8 * max(calls[:i]) for i in range(1, first_miss + 1)), calls
    assert len(calls) - 1 <= 10  # the check above ran one more


def test_a_probe_that_runs_far_longer_than_the_ones_before_it_is_stopped():
    from autobatch import TrialBudget

    budget = TrialBudget(train_samples=2048, val_samples=512)
    assert probe_timeout([], budget, n_val=1000) is None  # nothing to go by yet
    completed = TrialResult(status="ok", config=TrialConfig(32), samples_trained=64, timings={"wall": 3.2})
    failed = TrialResult(status="oom", config=TrialConfig(512), samples_trained=0, timings={"wall": 9.0})
    # 0.05 s per sample, over 2048 trained and 512 evaluated, 20 times over
    assert probe_timeout([completed, failed], budget, n_val=1000) == pytest.approx(20 * 0.05 * 2560)
    short = TrialBudget(train_samples=64, val_samples=None)  # the whole split: 10 samples
    assert probe_timeout([completed], short, n_val=10) == PROBE_TIMEOUT_FLOOR  # 74 s estimated


def test_probe_bisects_when_the_model_overshoots():
    # Memory grows faster past 100 samples (e.g. an allocator switching strategy).
    calls = []

    def run(micro_batch):
        calls.append(micro_batch)
        peak = 100 * MIB + MIB * micro_batch + (4 * MIB * (micro_batch - 100) if micro_batch > 100 else 0)
        return TrialResult(
            status="ok" if peak <= 600 * MIB else "oom", config=TrialConfig(micro_batch), peak_memory_bytes=peak
        )

    probe = find_memory_wall(run, int(600 * MIB / 0.95), safety_margin=0.05)
    truth = 100 + (600 - 200) // 5  # 180
    assert truth * 0.97 <= probe.max_micro_batch <= truth


def test_probe_steps_past_a_model_whose_readings_run_high():
    # The readings carry 30 MiB the cap does not see (copy-on-write pages in a forked trial).
    calls = []

    def run(micro_batch):
        calls.append(micro_batch)
        enforced = 300 * MIB + 2.3 * MIB * micro_batch
        status = "ok" if enforced <= 0.95 * 1024 * MIB else "oom"
        return TrialResult(status=status, config=TrialConfig(micro_batch), peak_memory_bytes=enforced + 30 * MIB)

    probe = find_memory_wall(run, 1024 * MIB, safety_margin=0.05)
    truth = math.floor((0.95 * 1024 * MIB - 300 * MIB) / (2.3 * MIB))
    assert truth * 0.97 <= probe.max_micro_batch <= truth
    assert len(calls) <= 10


def test_probe_reports_a_budget_too_small_for_one_sample():
    calls = []
    runner = _affine_runner(2000 * MIB, MIB, calls)
    runner.cap = 950 * MIB
    with pytest.raises(ProbeError, match="even micro-batch 1 does not fit"):
        find_memory_wall(runner, 1000 * MIB)


def test_search_space_rejects_reversed_bounds_and_bad_rules():
    with pytest.raises(InvalidParameterError, match="max_micro_batch"):
        SearchSpace(min_micro_batch=64, max_micro_batch=8)
    with pytest.raises(InvalidParameterError, match="lr_rule"):
        SearchSpace(lr_rule="cubic")
    with pytest.raises(InvalidParameterError, match="max_accumulation"):
        SearchSpace(max_accumulation=0)


def _true_best(wall):
    """Best throughput among configs within 2% of the best loss, over a fine grid."""
    candidates = []
    for micro in range(1, wall + 1):
        for accumulation in range(1, 9):
            effective = micro * accumulation
            for offset in np.linspace(-1, 1, 81):
                lr = synthetic.BEST_LR_AT_32 * math.sqrt(effective / 32) * 10**offset
                candidates.append((synthetic.throughput(micro, accumulation), synthetic.loss(effective, lr)))
    best_loss = min(loss for _, loss in candidates)
    return max(speed for speed, loss in candidates if loss <= best_loss * 1.02), best_loss


def _bisected_wall(cap_bytes: int) -> int:
    """The largest micro-batch that runs under ``cap_bytes``: plain trials, bisected, no memory model."""
    with TrialWorker(SYNTHETIC["task"], SYNTHETIC["backend"], memory_budget=cap_bytes, device="cpu") as worker:

        def fits(micro_batch: int) -> bool:
            result = worker.run(TrialConfig(micro_batch))
            assert result.status in ("ok", "oom"), result.error
            return result.status == "ok"

        fitting, too_big = 1, 1024
        assert fits(fitting) and not fits(too_big)
        while too_big - fitting > 1:
            middle = (fitting + too_big) // 2
            if fits(middle):
                fitting = middle
            else:
                too_big = middle
    return fitting


@pytest.mark.slow
def test_the_study_finds_the_known_optimum_of_a_synthetic_backend(tmp_path, monkeypatch):
    # The synthetic backend's wall is exact to 1 MiB, one sample. With glibc's huge pages on
    # (the children's default) the heap grows in 2 MiB steps, so the wall a process reaches
    # moves by up to two samples between processes (bisected 12 times: 105-107); without
    # them it is 107 every time. The probe's search is what this test checks, at 1 MiB.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    result = tune(
        **SYNTHETIC,
        memory_budget="256MiB",
        n_trials=40,
        storage=f"sqlite:///{tmp_path}/s.db",
        seed=1,
        device="cpu",
        objective="pareto",
    )
    # The truth, found without the probe: the largest micro-batch that runs under the probe's cap
    # (the budget less the 5% margin), bisected with plain trials.
    wall = _bisected_wall(int(256 * MIB * 0.95))
    assert 0.97 * wall <= result.max_micro_batch <= wall, (result.max_micro_batch, wall)
    best_speed, best_loss = _true_best(wall)
    recommended = result.recommended
    assert recommended["throughput"] >= 0.95 * best_speed
    # The search comes within 1% of the true best loss; the recommendation is the fastest config
    # within loss_tolerance (2%) of the best it found, so the two tolerances compound against the truth.
    best_found = min(t.values[1] for t in result.study.trials if t.user_attrs.get("feasible"))
    assert best_found <= best_loss * 1.01
    assert recommended["val_loss"] <= best_found * 1.02 + 1e-9
    assert result.n_trials == 40 and result.n_oom_trials == 0
    assert len(result.probe["probes"]) <= 10


@pytest.mark.slow
def test_trials_record_what_a_person_reads_in_the_dashboard(tmp_path):
    result = tune(
        **SYNTHETIC,
        memory_budget="256MiB",
        n_trials=3,
        storage=f"sqlite:///{tmp_path}/s.db",
        device="cpu",
        objective="pareto",
    )
    study = result.study
    assert study.metric_names == ["throughput (samples/s)", "validation loss"]
    for trial in study.trials:
        attrs = trial.user_attrs
        for key in (
            "effective_batch_size",
            "peak_memory_bytes",
            "memory_budget_bytes",
            "feasible",
            "oom",
            "oom_phase",
            "skipped_by_model",
            "framework",
            "device",
            "timings",
        ):
            assert key in attrs, key
        # The constraint is peak / budget - 1, against what is known without reading it back: the
        # budget asked for, and the bytes the synthetic trial touches above the process's baseline.
        assert attrs["memory_budget_bytes"] == 256 * MIB
        touched = synthetic.BASE_BYTES + synthetic.PER_SAMPLE_BYTES * attrs["micro_batch_size"]
        implied_peak = (1 + trial.constraints["memory"]) * 256 * MIB
        assert implied_peak == pytest.approx(attrs["baseline_memory_bytes"] + touched, abs=2 * MIB)
        assert -1 < trial.constraints["memory"] < 0  # it fits
    from optuna_dashboard import get_note

    note = get_note(study)
    assert f"micro-batch {result.recommended['micro_batch_size']}" in note and "Infeasible trials" in note


@pytest.mark.slow
def test_configs_predicted_over_budget_are_recorded_as_skipped_not_run(tmp_path):
    # The wall is near 110; the search goes past it, and past the 1-epoch horizon's effective batches.
    space = SearchSpace(min_micro_batch=64, max_micro_batch=400, max_effective_batch=400)
    result = tune(
        **SYNTHETIC,
        memory_budget="256MiB",
        n_trials=8,
        storage=f"sqlite:///{tmp_path}/s.db",
        device="cpu",
        search_space=space,
        sampler="random",
    )
    skipped = [t for t in result.study.trials if t.user_attrs["skipped_by_model"]]
    ran = [t for t in result.study.trials if not t.user_attrs["skipped_by_model"]]
    assert skipped and ran
    for trial in skipped:
        assert trial.user_attrs["micro_batch_size"] > result.max_micro_batch
        assert trial.constraints["memory"] > 0 and "timings" not in trial.user_attrs
    assert all(t.user_attrs["micro_batch_size"] <= result.max_micro_batch for t in ran)
    assert result.n_oom_trials == 0


@pytest.mark.slow
def test_a_minimum_above_the_wall_is_bad_input(tmp_path):
    with pytest.raises(InvalidParameterError, match="min_micro_batch=150 is invalid: must be <= 1"):
        tune(
            **SYNTHETIC,
            memory_budget="256MiB",
            n_trials=2,
            storage=f"sqlite:///{tmp_path}/s.db",
            device="cpu",
            search_space=SearchSpace(min_micro_batch=150),
        )
    assert not (tmp_path / "s.db").exists()


def _trial_count(path):
    with sqlite3.connect(path) as connection:
        return connection.execute("select count(*) from trials").fetchone()[0]


@pytest.mark.slow
def test_bad_input_leaves_the_storage_as_it_was(tmp_path):
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    tune(**SYNTHETIC, memory_budget="256MiB", n_trials=2, storage=url, study_name="kept", device="cpu")
    before = _trial_count(path)
    attempts = [
        (
            dict(search_space=SearchSpace(min_micro_batch=1, max_micro_batch=10**6), loss_tolerance=-0.1),
            InvalidParameterError,
            r"loss_tolerance=-0.1 is invalid: must be a number >= 0",
        ),
        (dict(sampler="annealing"), InvalidParameterError, r"sampler='annealing' is invalid: must be one of"),
        (dict(n_trials=-3), InvalidParameterError, r"n_trials=-3 is invalid: must be an integer >= 1"),
        (dict(memory_budget="lots"), InvalidParameterError, r"memory_budget='lots' is invalid: expected a size"),
        (  # below what micro-batch 1 needs
            dict(memory_budget="8MiB", study_name="too-small"),
            ProbeError,
            r"even micro-batch 1 does not fit the memory budget \(8388608 bytes",
        ),
        (  # another kind of study under that name
            dict(study_name="kept", memory_budget="300MiB"),
            StorageError,
            r"study_name='kept' was made for memory_budget_bytes=268435456, not 314572800",
        ),
    ]
    for extra, error, message in attempts:
        kwargs = dict(SYNTHETIC, memory_budget="256MiB", n_trials=2, storage=url, study_name="kept", device="cpu")
        kwargs.update(extra)
        with pytest.raises(error, match=message):
            tune(**kwargs)
        assert _trial_count(path) == before, extra
    with pytest.raises(StorageError, match="does not exist"):
        tune(**SYNTHETIC, n_trials=1, storage=f"sqlite:///{tmp_path}/missing/dir/s.db", device="cpu")
    with pytest.raises(StorageError, match="cannot be opened"):
        tune(**SYNTHETIC, n_trials=1, storage="postgresql+psycopg://nobody@127.0.0.1:1/none", device="cpu")


@pytest.mark.slow
# Resuming without a second probe is tests/test_reliability.py's to check in the default run; this is the CLI's
@pytest.mark.extended
def test_cli_tune_on_synthetic_images_then_resume_without_probing_again(run_cli, tmp_path):
    args = [
        "tune",
        "synthetic-images",
        "--backend",
        "torch",
        "--memory-budget",
        "640MiB",
        "--trials",
        "6",
        "--samples",
        "256",
        "--max-accumulation",  # the wall's confirmation at the largest accumulation is tests/test_wall.py's to check
        "2",
        "--storage",
        f"sqlite:///{tmp_path}/a.db",
        "--study-name",
        "images",
        "--json",
    ]
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("{"), first.stdout[:2000] + first.stderr[-2000:]
    result = json.loads(first.stdout)
    recommended = result["recommended"]
    assert recommended is not None and recommended["peak_memory_bytes"] < result["memory_budget_bytes"]
    assert result["n_oom_trials"] == 0 and result["n_trials"] == 6
    assert set(recommended) >= {
        "micro_batch_size",
        "accumulation_steps",
        "learning_rate",
        "effective_batch_size",
        "throughput",
        "val_loss",
        "peak_memory_bytes",
    }

    # Two more trials are enough to show the resume: it adds to the study and does not probe again.
    second = run_cli(*[arg if arg != "6" else "2" for arg in args], timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads(second.stdout)
    assert again["n_trials"] == 8
    assert again["probe"] == result["probe"]  # not probed again
    assert again["max_micro_batch"] == result["max_micro_batch"]

    shown = run_cli("show", "--storage", f"sqlite:///{tmp_path}/a.db", "--study-name", "images", "--json")
    assert json.loads(shown.stdout)["n_trials"] == 8


def test_cli_tune_bad_input_names_the_option(run_cli, tmp_path):
    done = run_cli(
        "tune",
        "digits-mlp",
        "--min-micro-batch",
        "64",
        "--max-micro-batch",
        "8",
        "--storage",
        f"sqlite:///{tmp_path}/x.db",
    )
    assert done.returncode == 2 and "--max-micro-batch" in done.stderr and "reversed" in done.stderr
    assert not (tmp_path / "x.db").exists()
    done = run_cli("tune", "digits-mlp", "--loss-tolerance", "-1", "--storage", f"sqlite:///{tmp_path}/x.db")
    assert done.returncode == 2 and "--loss-tolerance" in done.stderr
    done = run_cli("show", "--storage", f"sqlite:///{tmp_path}/x.db", "--study-name", "nothing")
    assert done.returncode == 2 and "no such study" in done.stderr
