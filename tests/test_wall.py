"""The wall holds for every searched config: the probe finds it at one accumulation step, and a search
trial at the wall with the largest accumulation the search tries fits the same real budget."""

import math
import os
import subprocess
import sys

import pytest

from autobatch import SearchSpace, TrialBudget, TrialConfig, TrialResult, run_trial, tune
from autobatch.process.child import allocator_environment
from autobatch.process.worker import TrialWorker
from autobatch.search.probe import MAX_ACCUMULATED_PROBES, ProbeError, ProbeResult, find_memory_wall

MIB = 2**20
SYNTHETIC = dict(task="tests.synthetic_backend:workload", backend="tests.synthetic_backend:SyntheticBackend")

#: per framework: a CPU budget whose wall is a moderate micro-batch on synthetic-images (about 135 on
#: PyTorch, 48 on TensorFlow here: 690 MiB gave 55 while a TensorFlow trial held a tensor copy of the
#: training split, and reaches the ceiling of 64 without it), the probe's safety margin, and samples enough that a trial at the wall
#: with the largest accumulation trains a whole window. PyTorch's peak repeats to 1 MiB
#: (autobatch.process.child fixes glibc's mmap threshold), so its margin is cut to 2 %: a wall that holds
#: only at one accumulation step fails here (before that fix and the per-micro-batch fetch, walls of
#: 63-90 ran out of memory at 8 steps under 520-560 MiB). TensorFlow keeps tune's 5 %, without oneDNN.
CASES = {"torch": ("520MiB", 0.02, 1280), "tensorflow": ("640MiB", 0.05, 512)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_search_trial_at_the_wall_with_the_largest_accumulation_fits(backend, tmp_path, monkeypatch):
    pytest.importorskip(backend)
    if backend == "tensorflow":
        # TensorFlow's oneDNN kernels (on by default on x86) fail at random under a CPU cap: about one
        # trial in 30 at the wall, at any accumulation and even with 10 % more budget than the probe had
        # ("could not create a primitive" in Conv2DBackpropFilter, then SIGSEGV). Without them, 40 of 40
        # trials at the wall x 8 fitted. The trial processes inherit this environment.
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    memory_budget, safety_margin, samples = CASES[backend]
    trial_budget = TrialBudget(train_samples=samples, val_samples=128, warmup_steps=0, min_timed_steps=1)
    # Above samples / 8 a trial could not train a whole window of 8: the probe need not look there
    space = SearchSpace(max_micro_batch=samples // SearchSpace().max_accumulation)
    found = tune(
        "synthetic-images",
        backend,
        memory_budget=memory_budget,
        safety_margin=safety_margin,
        n_trials=1,
        storage=f"sqlite:///{tmp_path}/wall.db",
        search_space=space,
        trial_budget=trial_budget,
        max_trial_samples=samples,
        device="cpu",
    )
    wall = found.max_micro_batch
    # The claim is about memory: the wall must come from the budget, and the trial below must
    # hold a whole window of the largest accumulation, or it would prove nothing.
    assert 16 <= wall < space.max_micro_batch, wall  # set by the budget, not by the ceiling

    config = TrialConfig(wall, space.max_accumulation, 1e-3)
    result = run_trial(
        "synthetic-images", backend, config, memory_budget=memory_budget, budget=trial_budget, device="cpu"
    )
    assert result.status == "ok", f"wall {wall} x {space.max_accumulation}: {result.status}: {result.error}"
    assert result.samples_trained >= wall * space.max_accumulation


@pytest.mark.slow
def test_pytorch_holds_no_more_data_at_eight_accumulation_steps_than_at_one():
    # Each micro-batch is fetched when the window step reaches it: a window of 8 used to be
    # fetched whole first (about 10 MiB more here: 7 micro-batches of 1.5 MiB uint8 images).
    pytest.importorskip("torch")
    budget = TrialBudget(train_samples=1024, val_samples=128, warmup_steps=0, min_timed_steps=1)
    with TrialWorker("synthetic-images", "torch", memory_budget="2GiB", device="cpu") as worker:
        results = {steps: worker.run(TrialConfig(128, steps, 1e-3), budget) for steps in (1, 8)}
    assert all(result.status == "ok" for result in results.values()), results
    micro_batch_bytes = 128 * 3 * 64 * 64
    growth = results[8].peak_memory_bytes - results[1].peak_memory_bytes
    assert growth < 2 * micro_batch_bytes, f"{growth / 2**20:.1f} MiB more at 8 steps"


def _affine_runner(accumulation, cap, intercept, per_sample):
    """A probe runner at ``accumulation`` whose peak is exactly affine, with a hard wall at ``cap``."""

    def run(micro_batch):
        peak = intercept + per_sample * micro_batch
        status = "ok" if peak <= cap else "oom"
        return TrialResult(
            status=status, config=TrialConfig(micro_batch, accumulation), peak_memory_bytes=min(peak, cap)
        )

    return run


def test_the_probe_lowers_a_wall_that_does_not_hold_at_the_largest_accumulation():
    # 10 % more memory per sample at 8 steps (a model or allocator whose memory grows with them).
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    at_eight = _affine_runner(8, cap, 300 * MIB, 2.2 * MIB)
    probe = find_memory_wall(at_one, budget, safety_margin=margin, confirm=at_eight)
    wall_at_one, wall_at_eight = (math.floor((cap - 300 * MIB) / (per_sample * MIB)) for per_sample in (2.0, 2.2))
    assert wall_at_eight * 0.97 <= probe.max_micro_batch <= wall_at_eight < wall_at_one
    assert probe.accumulation_steps == 8
    confirmations = [p for p in probe.probes if p["accumulation_steps"] == 8]
    assert {p["status"] for p in confirmations} == {"ok", "oom"} and len(confirmations) <= 8
    assert ProbeResult.from_dict(probe.to_dict()).accumulation_steps == 8


def test_a_wall_that_holds_at_the_largest_accumulation_costs_one_confirmation():
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    unconfirmed = find_memory_wall(at_one, budget, safety_margin=margin)
    confirmed = find_memory_wall(
        at_one, budget, safety_margin=margin, confirm=_affine_runner(8, cap, 300 * MIB, 2.0 * MIB)
    )
    assert confirmed.max_micro_batch == unconfirmed.max_micro_batch
    assert [p["status"] for p in confirmed.probes if p["accumulation_steps"] == 8] == ["ok"]
    assert (unconfirmed.accumulation_steps, confirmed.accumulation_steps) == (1, 8)


def test_short_probes_at_two_steps_place_the_wall_so_that_one_confirmation_holds():
    # Holding the gradients across a window adds a fixed 30 MiB at any accumulation past one
    # (PyTorch's .grad, TensorFlow's accumulators): the short probes at two steps must find the
    # lower wall, so that the full trial at eight runs once, and fits.
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    at_two, at_eight = (_affine_runner(steps, cap, 330 * MIB, 2.0 * MIB) for steps in (2, 8))
    probe = find_memory_wall(at_one, budget, safety_margin=margin, confirm=at_eight, accumulated=at_two)
    wall_at_eight = math.floor((cap - 330 * MIB) / (2.0 * MIB))
    assert wall_at_eight * 0.98 <= probe.max_micro_batch <= wall_at_eight
    phases = [p["phase"] for p in probe.probes]
    assert phases == sorted(phases, key=["one step", "accumulated", "confirmation"].index), phases
    assert 2 <= phases.count("accumulated") <= 1 + MAX_ACCUMULATED_PROBES
    assert [p["status"] for p in probe.probes if p["phase"] == "confirmation"] == ["ok"]
    assert {p["accumulation_steps"] for p in probe.probes if p["phase"] == "accumulated"} == {2}


def test_a_wall_that_the_short_probes_place_too_high_is_still_lowered_by_the_confirmation():
    # Memory that grows with the steps themselves (10 % more per sample at eight): two steps do
    # not show it, the confirmation does, and steps down from where the short probes left off.
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    at_two = _affine_runner(2, cap, 330 * MIB, 2.0 * MIB)
    at_eight = _affine_runner(8, cap, 330 * MIB, 2.2 * MIB)
    probe = find_memory_wall(at_one, budget, safety_margin=margin, confirm=at_eight, accumulated=at_two)
    wall_at_eight = math.floor((cap - 330 * MIB) / (2.2 * MIB))
    assert wall_at_eight * 0.97 <= probe.max_micro_batch <= wall_at_eight
    assert {p["status"] for p in probe.probes if p["phase"] == "confirmation"} == {"ok", "oom"}


def test_a_flat_memory_model_does_not_read_a_reading_difference_as_a_lower_wall():
    # Memory flat in the micro-batch (a few KiB per sample) and two steps reading 40 KiB more, as two
    # forked trials' peaks differ: divided by the slope that is a wall of no size; it must be read as
    # nothing, and the wall at one step stand (tests/test_study_paths.py's cliff task once fell 48 -> 12).
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 4096)
    at_two, at_eight = (_affine_runner(steps, cap, 300 * MIB + 40 * 1024, 4096) for steps in (2, 8))
    unconfirmed = find_memory_wall(at_one, budget, safety_margin=margin, upper_limit=4096)
    probe = find_memory_wall(
        at_one, budget, safety_margin=margin, upper_limit=4096, confirm=at_eight, accumulated=at_two
    )
    assert probe.max_micro_batch == unconfirmed.max_micro_batch == 4096


def test_an_estimate_far_off_is_bisected_to_the_wall_at_two_steps():
    # Two steps hold 10 MiB more, but the small probe reads 200 MiB more (a transient it caught):
    # the first guess lands 100 samples low, and the probes must still close in on the wall.
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    holds_more = _affine_runner(2, cap, 310 * MIB, 2.0 * MIB)

    def at_two(micro_batch):
        result = holds_more(micro_batch)
        if result.status == "ok":
            result.peak_memory_bytes += 190 * MIB  # misread, within the cap or not: only the status counts
        return result

    wall = math.floor((cap - 310 * MIB) / (2.0 * MIB))
    probe = find_memory_wall(
        at_one, budget, safety_margin=margin, confirm=_affine_runner(8, cap, 310 * MIB, 2.0 * MIB), accumulated=at_two
    )
    assert wall * 0.98 <= probe.max_micro_batch <= wall
    assert sum(p["phase"] == "accumulated" for p in probe.probes) <= 1 + MAX_ACCUMULATED_PROBES


def test_a_small_micro_batch_that_does_not_fit_at_two_steps_leaves_the_wall_to_the_confirmation():
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    at_two = _affine_runner(2, cap, 2000 * MIB, 2.0 * MIB)
    with pytest.raises(ProbeError, match="at accumulation 8, the largest the search"):
        find_memory_wall(
            at_one, budget, safety_margin=margin, accumulated=at_two, confirm=_affine_runner(8, cap, 2000 * MIB, 0)
        )


def test_a_failed_small_probe_at_two_steps_starts_the_confirmation_at_the_one_step_wall():
    # The test above ends in a ProbeError whatever the probes at two steps did, since nothing fits at
    # eight. Here eight fits below the one-step wall: had a failed small probe been taken as a bracket's
    # end, the probes at two steps would stop at that small micro-batch, and the confirmation with it.
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    at_two = _affine_runner(2, cap, 2000 * MIB, 2.0 * MIB)  # a two-step probe that never fits
    at_eight = _affine_runner(8, cap, 330 * MIB, 2.0 * MIB)
    probe = find_memory_wall(at_one, budget, safety_margin=margin, accumulated=at_two, confirm=at_eight)
    wall_at_eight = math.floor((cap - 330 * MIB) / (2.0 * MIB))
    assert wall_at_eight * 0.97 <= probe.max_micro_batch <= wall_at_eight
    assert [p["phase"] for p in probe.probes].count("accumulated") == 1


def test_no_micro_batch_that_fits_at_the_largest_accumulation_is_a_probe_error():
    budget, margin = 1024 * MIB, 0.05
    cap = budget * (1 - margin)
    at_one = _affine_runner(1, cap, 300 * MIB, 2.0 * MIB)
    with pytest.raises(ProbeError, match="at accumulation 8, the largest the search"):
        find_memory_wall(at_one, budget, safety_margin=margin, confirm=_affine_runner(8, cap, 2000 * MIB, 2.0 * MIB))


@pytest.mark.parametrize("max_accumulation", [1, 4])
def test_tune_confirms_the_wall_at_its_search_spaces_largest_accumulation(max_accumulation, tmp_path):
    result = tune(
        **SYNTHETIC,
        memory_budget="256MiB",
        n_trials=1,
        storage=f"sqlite:///{tmp_path}/s.db",
        # Effective batches past the 1-epoch horizon's: the wall's confirmation is what is checked here.
        search_space=SearchSpace(max_accumulation=max_accumulation, max_effective_batch=10**6),
        device="cpu",
    )
    assert result.probe["accumulation_steps"] == max_accumulation
    probes = result.probe["probes"]
    if max_accumulation == 1:
        assert {p["accumulation_steps"] for p in probes} == {1}  # nothing left to confirm
        return
    # The synthetic wall is exact to 1 MiB (one sample), and two forked children's heaps differ by
    # about that much, so the first confirmation may fail and step down: what must hold is that the
    # probes at one step come first, then the short ones at two, then the confirmations, only at the
    # space's largest accumulation (never 8), and that the wall is the largest one of them trained.
    phases = [(p["phase"], p["accumulation_steps"]) for p in probes]
    order = [("one step", 1), ("accumulated", 2), ("confirmation", max_accumulation)]
    assert phases == sorted(phases, key=order.index), phases
    confirmed = [p["micro_batch"] for p in probes if p["phase"] == "confirmation" and p["status"] == "ok"]
    assert result.max_micro_batch == max(confirmed), probes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_sample_budget_below_the_micro_batch_trains_at_any_accumulation(backend):
    # The confirmation at the largest accumulation runs such trials whenever the wall passes the
    # sample budget (digits-cnn: a wall of 1437 and 1024 samples); a window of one micro-batch has no
    # second batch size for the noise scale, and must not count (TensorFlow's raised ValueError).
    pytest.importorskip(backend)
    result = run_trial("digits-mlp", backend, TrialConfig(64, 8, 1e-3), budget=TrialBudget(train_samples=48))
    assert result.status == "ok", result.error
    assert not result.gradient_noise.get("windows"), result.gradient_noise


_METER_PEAK = """
import sys
import torch
from autobatch.backends.torch.accumulate import GradientNoiseMeter, train_window
from autobatch.backends.torch.training import supervised_loss

torch.manual_seed(0)
blocks = [torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 64)) for _ in range(8)]
model = torch.nn.Sequential(*blocks, torch.nn.Linear(64, 10))
optimizer = torch.optim.Adam(model.parameters(), 1e-3)
loss = supervised_loss(torch.nn.functional.cross_entropy)
window = [(torch.randn(2000, 64), torch.randint(0, 10, (2000,))) for _ in range(8)]
meter = GradientNoiseMeter(model.parameters()) if sys.argv[1] == "meter" else None
for _ in range(2):
    train_window(model, optimizer, loss, window, noise_meter=meter)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_measuring_the_noise_holds_no_more_memory_at_eight_accumulation_steps():
    # The meter once kept a new norm tensor per parameter and micro-batch to the window's end: each
    # pinned the top of glibc's heap above the freed gradient blocks of the micro-batches after it,
    # and the heap grew with the accumulation (here 43-70 MiB; at the wall, a confirmation at 8 steps
    # then failed where one at 1 step fitted: residual-mlp's wall 0.70x its minimal loop's).
    pytest.importorskip("torch")
    environment = {**os.environ, **allocator_environment()}  # as a trial child runs
    peaks = {}
    for mode in ("plain", "meter"):
        done = subprocess.run(
            [sys.executable, "-c", _METER_PEAK, mode], capture_output=True, text=True, env=environment, timeout=120
        )
        assert done.returncode == 0, done.stderr
        peaks[mode] = int(done.stdout.split()[-1]) * 1024
    assert peaks["meter"] - peaks["plain"] < 12 * MIB, {mode: peak / MIB for mode, peak in peaks.items()}
