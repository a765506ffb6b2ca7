"""Adaptive micro-batching: an OOM splits the window and redoes it, and the math stays the same.

The controller's bookkeeping is tested with stand-in accumulate/apply functions. The
real thing runs ``autobatch.train`` under real memory budgets (RLIMIT_DATA in the
training process): the ``lengths`` task (tests/adaptive_tasks.py) runs out of memory
only in the windows that hold one of its long samples, and a run that adapts must end
with the weights of a run that used the small micro-batch from the start.
"""

from __future__ import annotations

import gc
import json
import math
import re
import weakref

import numpy as np
import pytest

from autobatch.core.adaptive import (
    Adaptation,
    MicroBatchController,
    MicroBatchOOMError,
    OptimizerStepOOMError,
)
from autobatch.errors import InvalidParameterError, StorageError
from autobatch.training.api import TrainingError, TrainingOOMError, plan_epochs, train
from tests import adaptive_tasks

MIB = 2**20
LENGTHS = "tests.adaptive_tasks:lengths"
# The lengths task's budget: its long samples fit in micro-batches of 8, not of 16, above what
# the framework, the data and the model hold (measured: PyTorch 2.13 ~+440 MiB at 8 and ~+810 at
# 16; TensorFlow 2.21 fits 8 from ~+290 MiB and 16 only from ~+610).
BUDGET_ABOVE_BASELINE = {"torch": 630 * MIB, "tensorflow": 450 * MIB}


class FakeOOM(Exception):
    pass


def is_fake_oom(error: BaseException) -> bool:
    return isinstance(error, FakeOOM)


class Held:
    """What a failed step's frames hold (a tensor, in real life), until the error is let go of."""


class Recorder:
    """Stand-in framework: micro-batches larger than ``limit`` run out of memory."""

    def __init__(self, limit: int, fail_in_apply: bool = False):
        self.limit = limit
        self.fail_in_apply = fail_in_apply
        self.calls: list[tuple[int, int, float]] = []
        self.applied: list[list[tuple[int, int, float]]] = []
        self.pending: list[tuple[int, int, float]] = []
        self.releases = 0
        self.held = None

    def accumulate(self, start: int, stop: int, share: float) -> None:
        self.calls.append((start, stop, share))
        held = Held()  # noqa: F841 - kept alive by this frame while a traceback refers to it
        self.held = weakref.ref(held)
        if stop - start > self.limit:
            raise FakeOOM(f"can't allocate memory for {stop - start} samples")
        self.pending.append((start, stop, share))

    def apply(self) -> float:
        if self.fail_in_apply:
            raise FakeOOM("optimizer state")
        self.applied.append(self.pending)
        self.pending = []
        return 0.5

    def release(self) -> None:
        gc.collect()
        assert self.held() is None, "the failed attempt's frames still hold its memory"
        self.pending = []
        self.releases += 1


def run(controller: MicroBatchController, recorder: Recorder, window_size: int, epoch: int | None = None):
    return controller.run_window(
        window_size, recorder.accumulate, recorder.apply, is_oom=is_fake_oom, release=recorder.release, epoch=epoch
    )


# -- the controller ----------------------------------------------------------------------------------


def test_a_window_splits_into_micro_batches_weighted_by_their_share():
    controller = MicroBatchController(4)
    assert controller.split(10) == [(0, 4), (4, 8), (8, 10)]
    assert controller.accumulation_steps(10) == 3
    recorder = Recorder(limit=100)
    assert run(controller, recorder, 10) == 0.5
    shares = [share for _, _, share in recorder.applied[0]]
    assert shares == [0.4, 0.4, 0.2] and math.isclose(sum(shares), 1.0)
    assert controller.adaptations == [] and controller.samples_seen == 10 and controller.steps_done == 1


def test_an_oom_halves_the_micro_batch_and_redoes_the_window_from_its_start():
    seen = []
    controller = MicroBatchController(8, grow_after=None, on_adaptation=seen.append)
    recorder = Recorder(limit=4)
    run(controller, recorder, 16, epoch=3)
    # 8 fails at once, 4 does: the window is done again from sample 0, in the same order.
    assert recorder.calls[0] == (0, 8, 0.5)
    assert recorder.applied == [[(0, 4, 0.25), (4, 8, 0.25), (8, 12, 0.25), (12, 16, 0.25)]]
    assert recorder.releases == 1
    assert controller.micro_batch_size == 4 and controller.samples_seen == 16
    [adaptation] = controller.adaptations
    assert seen == [adaptation]
    assert (adaptation.step, adaptation.epoch, adaptation.cause) == (1, 3, "oom")
    assert (adaptation.old_micro_batch, adaptation.old_accumulation) == (8, 2)
    assert (adaptation.new_micro_batch, adaptation.new_accumulation) == (4, 4)
    assert adaptation.effective_batch_size == 16 and "can't allocate memory" in adaptation.detail
    assert Adaptation.from_dict(json.loads(json.dumps(adaptation.to_dict()))) == adaptation


def test_an_oom_mid_window_drops_the_partial_window_and_halves_until_it_fits():
    controller = MicroBatchController(16, grow_after=None)
    recorder = Recorder(limit=5)
    run(controller, recorder, 12)  # 16 (one micro-batch of 12) fails, 8 fails, 4 fits
    assert [a.new_micro_batch for a in controller.adaptations] == [8, 4]
    assert recorder.applied == [[(0, 4, 1 / 3), (4, 8, 1 / 3), (8, 12, 1 / 3)]]
    assert recorder.releases == 2


def test_the_size_grows_back_after_clean_windows_but_never_past_the_maximum():
    controller = MicroBatchController(8, max_micro_batch=12, grow_after=2)
    recorder = Recorder(limit=4)
    run(controller, recorder, 16)  # 8 -> 4; the redone window is the first clean one at 4
    assert controller.micro_batch_size == 4
    recorder.limit = 100
    run(controller, recorder, 16)  # two clean windows at 4: grow to 8 from step 3
    assert controller.micro_batch_size == 8
    grow = controller.adaptations[-1]
    assert (grow.cause, grow.step, grow.old_micro_batch, grow.new_micro_batch) == ("grow", 3, 4, 8)
    assert (grow.old_accumulation, grow.new_accumulation) == (4, 2)
    run(controller, recorder, 16)
    run(controller, recorder, 16)
    assert controller.micro_batch_size == 12  # capped at the maximum, not 16
    for _ in range(4):
        run(controller, recorder, 16)
    assert controller.micro_batch_size == 12
    assert all(a.effective_batch_size == 16 for a in controller.adaptations)


def test_a_grown_size_that_fails_again_waits_twice_as_long_before_growing():
    controller = MicroBatchController(8, grow_after=2)
    recorder = Recorder(limit=4)
    run(controller, recorder, 8)  # 8 -> 4
    recorder.limit = 100
    run(controller, recorder, 8)  # grown back to 8
    assert controller.micro_batch_size == 8
    recorder.limit = 4
    run(controller, recorder, 8)  # 8 fails again -> 4; the next growth waits for 4 clean windows
    recorder.limit = 100
    for _ in range(2):
        run(controller, recorder, 8)
    assert controller.micro_batch_size == 4
    run(controller, recorder, 8)
    assert controller.micro_batch_size == 8
    assert [a.cause for a in controller.adaptations] == ["oom", "grow", "oom", "grow"]
    assert controller.adaptations[-1].detail == "4 clean windows at micro-batch 4"


def test_without_adaptation_an_oom_names_itself_and_what_to_do():
    controller = MicroBatchController(512, adaptive=False)
    with pytest.raises(MicroBatchOOMError) as caught:
        run(controller, Recorder(limit=100), 512)
    message = str(caught.value)
    assert "out of memory" in message and "--adaptive" in message
    assert "--micro-batch 256 --accumulation 2" in message and "512" in message
    assert caught.value.step == 1 and caught.value.micro_batch_size == 512
    assert isinstance(caught.value.__cause__, FakeOOM)


def test_an_oom_at_the_smallest_micro_batch_is_an_error():
    controller = MicroBatchController(2, min_micro_batch=1)
    with pytest.raises(MicroBatchOOMError, match="cannot be split further"):
        run(controller, Recorder(limit=0), 4)


def test_an_oom_in_the_optimizer_step_is_not_redone():
    controller = MicroBatchController(4)
    recorder = Recorder(limit=100, fail_in_apply=True)
    with pytest.raises(OptimizerStepOOMError, match="cannot be redone safely") as caught:
        run(controller, recorder, 8)
    assert caught.value.step == 1
    assert recorder.calls == [(0, 4, 0.5), (4, 8, 0.5)]  # accumulated once, no redo
    assert controller.steps_done == 0 and controller.samples_seen == 0 and controller.adaptations == []


def test_other_errors_pass_through_untouched():
    controller = MicroBatchController(4)

    def accumulate(start, stop, share):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        controller.run_window(8, accumulate, lambda: 0.0, is_oom=is_fake_oom, release=lambda: None)
    assert controller.adaptations == []


def test_controller_parameters_are_checked():
    with pytest.raises(InvalidParameterError, match="micro_batch_size"):
        MicroBatchController(0)
    with pytest.raises(InvalidParameterError, match="max_micro_batch"):
        MicroBatchController(8, max_micro_batch=4)
    with pytest.raises(InvalidParameterError, match="grow_after"):
        MicroBatchController(8, grow_after=0)


def test_the_window_plan_does_not_depend_on_the_micro_batch():
    plan = plan_epochs(10, 4, epochs=2, seed=3)
    assert [(epoch, len(indices)) for epoch, indices in plan] == [(1, 4), (1, 4), (1, 2), (2, 4), (2, 4), (2, 2)]
    for epoch in (1, 2):
        seen = np.concatenate([indices for e, indices in plan if e == epoch])
        assert sorted(seen.tolist()) == list(range(10))  # each epoch: every sample once
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(plan, plan_epochs(10, 4, epochs=2, seed=3), strict=True))
    assert sum(len(indices) for _, indices in plan_epochs(10, 4, epochs=2, seed=3, max_samples=7)) == 7


# -- PyTorch, in this process: the redo rolls back gradients and buffers ------------------------------------


def test_torch_batcher_redo_equals_the_small_micro_batch_from_the_start():
    torch = pytest.importorskip("torch")
    from autobatch.backends.torch import AdaptiveMicroBatcher

    class Counting(torch.nn.Module):
        """A linear model that counts its samples, and runs out of memory in the second big micro-batch of window 2."""

        def __init__(self, fail_above: int | None):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(3, 2)
            self.register_buffer("seen", torch.zeros(()))
            self.fail_above = fail_above
            self.window = 0

        def forward(self, x):
            self.seen += len(x)
            if self.fail_above is not None and self.window == 1 and len(x) > self.fail_above and self.seen > 18:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
            return self.linear(x)

    generator = torch.Generator().manual_seed(1)
    windows = [
        (torch.randn(12, 3, generator=generator), torch.randint(0, 2, (12,), generator=generator)) for _ in range(3)
    ]

    def train_with(micro: int, fail_above: int | None):
        model = Counting(fail_above)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        batcher = AdaptiveMicroBatcher(
            model, optimizer, torch.nn.functional.cross_entropy, micro_batch_size=micro, grow_after=None
        )
        for index, (x, y) in enumerate(windows):
            model.window = index
            batcher.step(x, y)
        return model, batcher

    # The first micro-batch of window 2 ran forward and backward before the second failed:
    # its gradient and its count must be dropped, or they would be counted twice.
    adapted, batcher = train_with(6, fail_above=3)
    reference, _ = train_with(3, fail_above=None)
    [adaptation] = batcher.adaptations
    assert (adaptation.step, adaptation.old_micro_batch, adaptation.new_micro_batch) == (2, 6, 3)
    assert (adaptation.old_accumulation, adaptation.new_accumulation) == (2, 4)
    assert float(adapted.seen) == float(reference.seen) == 36  # the failed attempt's count was rolled back
    assert batcher.samples_seen == 36
    for a, b in zip(adapted.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


# -- real budgets, both frameworks ------------------------------------------------------------------------------


def _weights(path) -> dict:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_run_that_adapts_ends_with_the_weights_of_the_small_micro_batch(backend, tmp_path):
    # PyTorch raises its OOM and the window is redone in the same process; it also grows back after
    # two clean windows and runs out of memory again. TensorFlow on the CPU is redone in a new process
    # from a checkpoint (its runtime cannot be trusted after an OOM there), and waits 10 s inside its
    # allocator before it gives up on an allocation: it adapts once.
    grow_after = 2 if backend == "torch" else None
    reference = train(LENGTHS, backend, micro_batch_size=8, accumulation_steps=4, output=tmp_path / "small.npz")
    budget = reference.baseline_memory_bytes + BUDGET_ABOVE_BASELINE[backend]
    adapted = train(
        LENGTHS,
        backend,
        micro_batch_size=16,
        accumulation_steps=2,
        adaptive=True,
        grow_after=grow_after,
        memory_budget=budget,
        output=tmp_path / "adapted.npz",
    )

    causes = [a.cause for a in adapted.adaptations]
    expected_cause = "oom" if backend == "torch" else "crash"
    assert expected_cause in causes, (
        f"no OOM under {budget / MIB:.0f} MiB (peak {adapted.peak_memory_bytes}): recalibrate"
    )
    if backend == "torch":
        assert "grow" in causes and causes.count("oom") >= 2 and adapted.restarts == 0
    else:
        assert causes == ["crash"] and adapted.restarts == 1
    assert all(
        a.old_micro_batch * a.old_accumulation == a.new_micro_batch * a.new_accumulation == 32
        for a in adapted.adaptations
    )
    assert all(a.effective_batch_size == 32 for a in adapted.adaptations)
    assert adapted.effective_batch_sizes == reference.effective_batch_sizes == [32]
    assert adapted.memory_budget_bytes == budget and adapted.peak_memory_bytes <= budget

    # No sample lost, none seen twice: the result's count, and the model's own counters.
    assert adapted.samples_seen == reference.samples_seen == adaptive_tasks.N_TRAIN
    assert adapted.steps == reference.steps == adaptive_tasks.N_TRAIN // 32
    expected = adaptive_tasks.expected_counters(epochs=1)
    small, big = _weights(tmp_path / "small.npz"), _weights(tmp_path / "adapted.npz")
    assert adaptive_tasks.counters(big) == adaptive_tasks.counters(small) == expected

    assert small.keys() == big.keys()
    for name in small:
        np.testing.assert_allclose(big[name], small[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert math.isclose(adapted.val_loss, reference.val_loss, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.slow
def test_training_from_a_study_takes_its_recommendation_wall_and_budget(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name="lengths", directions=["maximize", "minimize"])
    task = "tests.adaptive_tasks:crashing"  # a small model: micro-batches of 8 never crash
    study.set_user_attr(
        "autobatch",
        {
            "task": task,
            "backend": "torch",
            "device": "cpu",
            "memory_budget_bytes": 3 * 2**30,
            "trial_budget": {"mixed_precision": False},
        },
    )
    study.set_user_attr("autobatch_probe", {"max_micro_batch": 24})
    attrs = {
        "micro_batch_size": 8,
        "accumulation_steps": 2,
        "effective_batch_size": 16,
        "learning_rate": 0.02,
        "feasible": True,
        "peak_memory_bytes": 2**29,
    }
    study.add_trial(optuna.trial.create_trial(values=[100.0, 0.5], user_attrs=attrs))

    result = train(task, "torch", study_name="lengths", storage=storage, max_samples=32, adaptive=True)
    assert (result.config.micro_batch_size, result.config.accumulation_steps) == (8, 2)
    assert result.config.learning_rate == 0.02 and result.study_name == "lengths"
    assert result.max_micro_batch_size == 24  # the probe's wall: how far the micro-batch may grow back
    assert result.memory_budget_bytes == 3 * 2**30 and result.device == "cpu"
    assert result.samples_seen == 32 and result.steps == 2

    with pytest.raises(InvalidParameterError, match="not both"):
        train(task, "torch", study_name="lengths", storage=storage, micro_batch_size=4)
    with pytest.raises(StorageError, match="made for backend='torch'"):
        train(task, "tensorflow", study_name="lengths", storage=storage)
    with pytest.raises(StorageError, match="made for task="):
        train(LENGTHS, "torch", study_name="lengths", storage=storage)


def test_bad_input_is_refused_before_any_training(run_cli, tmp_path):
    done = run_cli("train", LENGTHS, "--epochs", "0", "--micro-batch", "8")
    assert done.returncode == 2 and "--epochs=0 is invalid" in done.stderr
    done = run_cli("train", LENGTHS, "--micro-batch", "8", "--output", str(tmp_path / "missing" / "model.pt"))
    assert done.returncode == 2 and "--output=" in done.stderr and "does not exist" in done.stderr
    done = run_cli("train", LENGTHS, "--backend", "tensorflow", "--micro-batch", "8", "--output", "model.pt")
    assert done.returncode == 2 and ".weights.h5" in done.stderr
    done = run_cli("train", LENGTHS)
    assert done.returncode == 2 and "--micro-batch" in done.stderr
    done = run_cli("train", LENGTHS, "--micro-batch", "8", "--num-workers", "2")
    assert done.returncode == 2 and "--num-workers=2" in done.stderr and "data-loading" in done.stderr


# -- the command line, on the synthetic-images study --------------------------------------------------------------


@pytest.mark.slow
def test_a_framework_that_dies_of_an_oom_is_resumed_from_its_checkpoint_with_the_same_math(tmp_path):
    # TensorFlow's oneDNN kernels kill the process on some OOMs; this task's model does so on purpose.
    # With seed 6 the long samples fall in steps 4 and 6: step 4 dies at 16, and the new process
    # loads the checkpoint written after step 2, replays step 3 at 16 and redoes step 4 at 8.
    crashing = "tests.adaptive_tasks:crashing"
    options = {"accumulation_steps": 4, "seed": 6}
    reference = train(crashing, "torch", micro_batch_size=8, output=tmp_path / "small.npz", **options)  # never dies
    events: list[dict] = []
    adapted = train(
        crashing,
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
    [crash] = adapted.adaptations
    [restart] = [event for event in events if event["event"] == "restart"]
    assert adapted.restarts == 1
    assert (crash.cause, crash.step, crash.old_micro_batch, crash.new_micro_batch) == ("crash", 4, 16, 8)
    assert "OOM when allocating" in crash.detail and "SIGKILL" in crash.detail
    assert (restart["step"], restart["from_step"]) == (4, 3)
    micro_by_step = {event["step"]: event["micro"] for event in events if event["event"] == "window"}
    assert micro_by_step == {1: 16, 2: 16, 3: 16, 4: 8, 5: 8, 6: 8}  # each step reported once
    assert adapted.samples_seen == reference.samples_seen == adaptive_tasks.N_TRAIN
    small, big = _weights(tmp_path / "small.npz"), _weights(tmp_path / "adapted.npz")
    assert adaptive_tasks.counters(big) == adaptive_tasks.expected_counters(epochs=1)
    for name in small:
        np.testing.assert_allclose(big[name], small[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_silent_crash_mid_window_counts_as_an_oom_only_under_a_budget(tmp_path):
    # Same schedule as above, but the process dies of SIGSEGV and logs nothing.
    crashing = "tests.adaptive_tasks:silently_crashing"
    options = {"micro_batch_size": 16, "accumulation_steps": 2, "seed": 6, "grow_after": None, "checkpoint_every": 2}
    adapted = train(crashing, "torch", adaptive=True, memory_budget="8GiB", output=tmp_path / "adapted.npz", **options)
    [crash] = adapted.adaptations
    assert (crash.cause, crash.step, crash.old_micro_batch, crash.new_micro_batch) == ("crash", 4, 16, 8)
    assert "SIGSEGV with nothing logged" in crash.detail and "taken as out of memory" in crash.detail
    assert adapted.samples_seen == adaptive_tasks.N_TRAIN
    # Without a budget nothing says it was memory: the crash is an error, and nothing is written.
    with pytest.raises(TrainingError, match="killed by SIGSEGV") as raised:
        train(crashing, "torch", adaptive=True, output=tmp_path / "unbudgeted.npz", **options)
    assert not isinstance(raised.value, TrainingOOMError)
    assert not (tmp_path / "unbudgeted.npz").exists()


def test_a_poisoned_onednn_is_left_behind_in_a_new_process(tmp_path):
    # PyTorch's oneDNN refuses every kernel after one "could not create a primitive": the batcher
    # does not redo the window in that process, and `train` redoes it in a new one, with the same math.
    options = {"micro_batch_size": 16, "accumulation_steps": 2, "seed": 6, "grow_after": None, "checkpoint_every": 2}
    # the reference weights, in small.npz
    train(
        "tests.adaptive_tasks:crashing",
        "torch",
        micro_batch_size=8,
        accumulation_steps=4,
        seed=6,
        output=tmp_path / "small.npz",
    )
    adapted = train(
        "tests.adaptive_tasks:poisoning", "torch", adaptive=True, output=tmp_path / "adapted.npz", **options
    )
    [crash] = adapted.adaptations
    assert (crash.cause, crash.step, crash.old_micro_batch, crash.new_micro_batch) == ("crash", 4, 16, 8)
    assert "could not create a primitive" in crash.detail and adapted.restarts == 1
    small, big = _weights(tmp_path / "small.npz"), _weights(tmp_path / "adapted.npz")
    for name in small:
        np.testing.assert_allclose(big[name], small[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,budget",
    # TensorFlow's adaptive run is checked through train() in the default run; this is its CLI
    [("torch", "900MiB"), pytest.param("tensorflow", "850MiB", marks=pytest.mark.extended)],
)
def test_the_cli_adapts_under_a_budget_and_without_adaptive_fails_cleanly(backend, budget, run_cli, tmp_path):
    # PyTorch: 256 fits 900 MiB, 512 does not (with glibc's mmap threshold fixed under a budget,
    # 512 fits 1 GiB every time; it failed 900 and 960 MiB in every run measured). TensorFlow
    # varies from run to run with the order its threads run ops in; since its trials stopped holding
    # a tensor copy of the training split, 512 fits 1 GiB, and at 800-850 MiB it failed in 4 runs of
    # 4 and each went on at 256 x 2 (with the copy: 512 failed at 1.1-1.4 GiB and 1 GiB ended at 128).
    # On the CPU it mostly dies of the OOM rather than raising it: the run resumes in a new process.
    command = [
        "train",
        "synthetic-images",
        "--backend",
        backend,
        "--micro-batch",
        "512",
        "--accumulation",
        "1",
        "--memory-budget",
        budget,
        "--epochs",
        "1",
    ]
    done = run_cli(*command, "--adaptive", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert len(result["adaptations"]) >= 1
    assert result["effective_batch_sizes"] == [512] and result["samples_seen"] == 2048 and result["steps"] == 4
    for adaptation in result["adaptations"]:
        assert adaptation["effective_batch_size"] == 512
        assert adaptation["old_micro_batch"] * adaptation["old_accumulation"] == 512
        assert adaptation["new_micro_batch"] * adaptation["new_accumulation"] == 512
    assert math.isfinite(result["val_loss"]) and result["samples_per_second"] > 0
    # The progress output says so too. 512 is only a little over 900 MiB with PyTorch, so now and then
    # step 1 squeezes in and a later step is the first to split.
    assert re.search(r"step \d+: micro-batch 512 x 1 -> 256 x 2", done.stderr), done.stderr[-2000:]

    output = tmp_path / ("model.pt" if backend == "torch" else "model.weights.h5")
    done = run_cli(*command, "--json", "--output", str(output))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"autobatch train: error: out of memory at step \d+ in a micro-batch of 512", last), last
    assert "--adaptive" in last and "--micro-batch 256 --accumulation 2" in last
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing half-written
