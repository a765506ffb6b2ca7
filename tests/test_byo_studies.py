"""The three real-model studies, tuned for real: tiny-gpt2 and resnet18 (PyTorch), keras-text (Keras).

Each test runs a short ``tune()``: the probe finds a wall (a micro-batch that ran out of memory
in its worker, below the size of the training split), a few search trials run under the budget
in workers, and a feasible config is recommended, with no OOM outside the probe. For the two
sequence studies the wall is measured on the longest sequences, found from the data alone.
"""

from __future__ import annotations

import pytest

from autobatch import SearchSpace, TrialBudget, tune

pytestmark = pytest.mark.slow

#: short trials: the probe's cost grows with the wall, the search's with the samples trained
SHORT = TrialBudget(train_samples=64, val_samples=64, warmup_steps=1, min_timed_steps=1)
#: the probe confirms its wall at the largest accumulation: 2 keeps that window small
SPACE = SearchSpace(max_accumulation=2)


def _tune(study: str, backend: str, budget: str, tmp_path, space: SearchSpace = SPACE):
    return tune(
        study,
        backend=backend,
        memory_budget=budget,
        n_trials=2,
        storage=f"sqlite:///{tmp_path}/s.db",
        device="cpu",
        trial_budget=SHORT,
        max_trial_samples=SHORT.train_samples,
        search_space=space,
        trial_timeout=120,  # a trial that hangs fails the test instead of holding the suite
    )


def _assert_found_a_wall_and_a_feasible_config(result, n_train: int) -> None:
    statuses = [probe["status"] for probe in result.probe["probes"]]
    assert "oom" in statuses, result.probe  # a real wall: a probe ran out of memory in its worker
    assert 1 < result.max_micro_batch < n_train
    assert result.n_trials == 2 and result.n_oom_trials == 0 and result.n_failed_trials == 0
    recommended = result.recommended
    assert recommended is not None
    assert recommended["micro_batch_size"] <= result.max_micro_batch
    assert recommended["peak_memory_bytes"] <= result.memory_budget_bytes
    for trial in result.study.trials:
        if not trial.user_attrs["skipped_by_model"]:
            assert trial.user_attrs["feasible"] and not trial.user_attrs["oom"], trial.user_attrs


# Longest samples first is tests/test_torch_task.py's to check, the wall on them tests/test_worst_case.py's,
# transformers objects tests/test_integration_huggingface.py's; this is the whole study on the real model
@pytest.mark.extended
def test_tiny_gpt2_finds_its_wall_on_the_longest_sequences(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from autobatch.studies.tiny_gpt2 import MAX_LENGTH, token_sequences

    train, _ = token_sequences()
    result = _tune("tiny-gpt2", "torch", "850MiB", tmp_path)

    _assert_found_a_wall_and_a_feasible_config(result, len(train))
    longest = max(len(sequence) for sequence in train)
    assert longest == MAX_LENGTH
    assert result.worst_case_sample_size == longest  # found from the dict samples, without sample_size
    assert result.recommended["val_loss"] < 5.545  # below log(256): the model learned from its first samples


# BatchNorm's smallest micro-batch is tests/test_torch_task.py's to check, fast; this is the real torchvision model
@pytest.mark.extended
def test_resnet18_with_batch_norm_never_trains_on_one_sample(tmp_path):
    pytest.importorskip("torch")
    from autobatch.studies.resnet18 import TRAIN_SAMPLES

    # One step per window: the wall's confirmation at a larger accumulation is tests/test_wall.py's to check.
    result = _tune("resnet18", "torch", "800MiB", tmp_path, space=SearchSpace(max_accumulation=1))

    _assert_found_a_wall_and_a_feasible_config(result, TRAIN_SAMPLES)
    assert result.worst_case_sample_size is None  # images of one size: any window is the worst
    assert result.study.user_attrs["autobatch"]["task_min_micro_batch"] == 2  # BatchNorm: micro-batch 1 left out
    assert all(trial.user_attrs["micro_batch_size"] >= 2 for trial in result.study.trials)


# A compiled Keras model on tf.data, longest sequences measured: tests/test_keras_task.py's trials check
# it fast, tests/test_wall.py a TensorFlow study's wall; this is the whole study on the real model
@pytest.mark.extended
def test_keras_text_finds_its_wall_on_the_longest_sequences(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    # oneDNN's CPU allocator waits 10 s for memory before it reports an OOM (AllocatorRetry); without
    # it an OOM probe takes seconds, not tens of them (as in tests/test_wall.py). The study is the same.
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    from autobatch.studies.keras_text import MAX_LENGTH, token_split

    (train, _), _ = token_split()
    # One step per window: on the CPU each TensorFlow OOM costs seconds, and a confirmation at a larger
    # accumulation (tests/test_wall.py checks it for TensorFlow) costs several of them.
    result = _tune("keras-text", "tensorflow", "1.25GiB", tmp_path, space=SearchSpace(max_accumulation=1))

    _assert_found_a_wall_and_a_feasible_config(result, len(train))
    longest = max(len(sequence) for sequence in train)
    assert longest == MAX_LENGTH
    assert result.worst_case_sample_size == longest  # found from the (tokens, label) elements of tf.data
