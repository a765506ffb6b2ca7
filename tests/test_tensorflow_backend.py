"""The TensorFlow backend: one tape per micro-batch, no retracing, real OOMs, real memory savings."""

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import keras  # noqa: E402

from autobatch import TrialBudget, TrialConfig, load_workload, run_trial  # noqa: E402
from autobatch.backends.base import TrialProgress  # noqa: E402
from autobatch.backends.tensorflow import MicroBatchTrainer, TensorFlowBackend, batch_spec  # noqa: E402
from autobatch.backends.tensorflow.training import make_loss  # noqa: E402

GIB = 2**30


def _model_and_batch(seed=0, n=10):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input(shape=(6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)]
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int64)
    return model, x, y


def _trainer(model, optimizer, x, y):
    return MicroBatchTrainer(model, optimizer, "cross_entropy", x_spec=batch_spec(x), y_spec=batch_spec(y))


def _full_batch_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(make_loss("cross_entropy")(y, model(x, training=True)))
    return loss, tape.gradient(loss, model.trainable_variables)


def _splits(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _assert_all_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_accumulated_gradient_equals_full_batch_gradient_with_short_last_micro_batch():
    model, x, y = _model_and_batch()
    full_loss, full = _full_batch_gradients(model, x, y)
    trainer = _trainer(model, keras.optimizers.SGD(0.1), x, y)
    micro = _splits(x, y, 4)  # 4, 4 and a short 2
    assert [len(mb_y) for _, mb_y in micro] == [4, 4, 2]
    for mb_x, mb_y in micro:
        trainer.accumulate(mb_x, mb_y, tf.constant(len(mb_y) / len(y), tf.float32))
    _assert_all_close(trainer.accumulated_gradients, full)
    assert float(trainer.apply()) == pytest.approx(float(full_loss), rel=1e-5)
    # apply() zeroes the accumulators for the next window
    assert all(not np.any(g.numpy()) for g in trainer.accumulated_gradients)


def test_unweighted_accumulation_would_be_wrong():
    # Guards the test above: averaging micro-batch means equally gives a different gradient.
    model, x, y = _model_and_batch()
    _, full = _full_batch_gradients(model, x, y)
    trainer = _trainer(model, keras.optimizers.SGD(0.1), x, y)
    for mb_x, mb_y in _splits(x, y, 4):
        trainer.accumulate(mb_x, mb_y, tf.constant(1 / 3, tf.float32))
    assert any(
        not np.allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        for a, b in zip(trainer.accumulated_gradients, full, strict=True)
    )


def test_one_window_equals_one_full_batch_step():
    model_a, x, y = _model_and_batch(seed=1, n=13)
    model_b, _, _ = _model_and_batch(seed=2, n=13)
    model_b.set_weights(model_a.get_weights())  # same init
    trainer_a = _trainer(model_a, keras.optimizers.SGD(0.5, momentum=0.9), x, y)
    trainer_b = _trainer(model_b, keras.optimizers.SGD(0.5, momentum=0.9), x, y)
    loss_a = trainer_a.train_window([(x, y)])
    loss_b = trainer_b.train_window(_splits(x, y, 5))  # 5, 5, 3
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    _assert_all_close(model_b.get_weights(), model_a.get_weights())
    assert not np.allclose(model_a.get_weights()[0], _model_and_batch(seed=1, n=13)[0].get_weights()[0])  # it moved


def test_loss_scaling_scales_each_micro_batch_and_unscales_once_per_window():
    model_a, x, y = _model_and_batch(seed=3)
    model_b, _, _ = _model_and_batch(seed=4)
    model_b.set_weights(model_a.get_weights())
    _, full = _full_batch_gradients(model_a, x, y)
    scaled = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=2.0**10)
    trainer_scaled = _trainer(model_b, scaled, x, y)
    for mb_x, mb_y in _splits(x, y, 4):
        trainer_scaled.accumulate(mb_x, mb_y, tf.constant(len(mb_y) / len(y), tf.float32))
    _assert_all_close([g / 2.0**10 for g in trainer_scaled.accumulated_gradients], full)
    trainer_scaled.apply()
    _trainer(model_a, keras.optimizers.SGD(0.5), x, y).train_window([(x, y)])
    _assert_all_close(model_b.get_weights(), model_a.get_weights())


def test_windows_with_a_short_last_micro_batch_do_not_retrace():
    model, x, y = _model_and_batch(n=40)
    trainer = _trainer(model, keras.optimizers.Adam(1e-3), x, y)
    for start in (0, 10, 20):  # windows of 10 as micro-batches of 4, 4, 2
        trainer.train_window(_splits(x[start : start + 10], y[start : start + 10], 4))
    trainer.train_window(_splits(x[30:37], y[30:37], 4))  # 4, 3
    assert trainer.trace_counts == {"accumulate": 1, "apply": 1, "evaluate": 0}
    assert trainer.trace_count == 2


def test_evaluate_weights_every_sample_equally():
    model, x, y = _model_and_batch(n=10)
    reference = float(tf.reduce_mean(make_loss("cross_entropy")(y, model(x, training=False))))
    trainer = _trainer(model, keras.optimizers.SGD(0.1), x, y)
    for batch in (3, 4, 10):
        assert trainer.evaluate(x, y, batch) == pytest.approx(reference, rel=1e-5)
    assert trainer.evaluate(x, y, 4, limit=5) == pytest.approx(
        float(tf.reduce_mean(make_loss("cross_entropy")(y[:5], model(x[:5], training=False)))), rel=1e-5
    )
    assert trainer.trace_counts["evaluate"] == 1


def test_mse_is_a_per_sample_mean():
    loss = make_loss("mse")
    values = loss(np.array([[1.0, 2.0], [0.0, 0.0]], np.float32), np.array([[1.0, 4.0], [1.0, 1.0]], np.float32))
    np.testing.assert_allclose(values.numpy(), [2.0, 1.0])
    flat = loss(np.array([1.0, 2.0], np.float32), np.array([[2.0], [2.0]], np.float32))  # (N, 1) vs (N,)
    np.testing.assert_allclose(flat.numpy(), [1.0, 0.0])


def test_trial_in_process_is_repeatable_learns_and_traces_once():
    backend = TensorFlowBackend()
    workload = load_workload("digits-mlp")
    budget = TrialBudget(train_samples=1000, seed=5)
    config = TrialConfig(32, 2, 3e-3)  # 1000 = 15 windows of 64 + one of 40: its last micro-batch is short
    first = backend.run_trial(workload, config, budget, "cpu", TrialProgress())
    second = backend.run_trial(workload, config, budget, "cpu", TrialProgress())
    assert first.val_loss == pytest.approx(second.val_loss, rel=1e-5)
    assert first.val_loss < np.log(10) * 0.8  # better than chance after 1000 samples
    assert first.samples_per_second > 0 and first.steps_timed >= budget.min_timed_steps
    assert first.extras["traces"] == {"accumulate": 1, "apply": 1, "evaluate": 1}


def test_extra_windows_keep_throughput_measurable_when_the_budget_is_one_window():
    progress = TrialProgress()
    phases = []
    progress._on_phase = phases.append
    result = TensorFlowBackend().run_trial(
        load_workload("digits-cnn"), TrialConfig(256, 4, 1e-3), TrialBudget(train_samples=512), "cpu", progress
    )
    assert result.steps_timed == 2 and result.samples_per_second > 0
    assert phases == ["train", "eval", "train"]


def test_keras_models_have_the_torch_parameter_counts():
    torch = pytest.importorskip("torch")  # noqa: F841
    from autobatch.studies import keras_models, torch_models

    for name in ("digits_mlp", "digits_cnn", "synthetic_cnn"):
        keras_count = getattr(keras_models, name)().count_params()
        torch_count = sum(p.numel() for p in getattr(torch_models, name)().parameters())
        assert keras_count == torch_count, name


def test_synthetic_model_takes_uint8_channels_first_images():
    model = load_workload("synthetic-images").build_model("tensorflow")
    images = load_workload("synthetic-images").x_val[:4]
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 64, 64)
    assert model(images).shape == (4, 10)
    assert model.get_layer(index=1).name.startswith("rescaling")  # scaled inside, data stays uint8


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData"))


def test_dense_arrays_are_served_batch_by_batch_without_a_copy_of_the_split():
    from autobatch.backends.tensorflow.data import ArrayData

    # A 64 MiB split: a copy of it in a tensor, held for the trial's life, lowered TensorFlow's wall
    # below a plain loop's (synthetic-images peaked 70 MiB higher at a micro-batch of 256).
    x = np.arange(4096 * 4096, dtype=np.float32).reshape(4096, 4096)
    y = np.arange(4096, dtype=np.int64)
    before = _data_segment_bytes()
    data = ArrayData(x, y)
    assert _data_segment_bytes() - before < 8 * 2**20
    first, second = (np.array([3, 0, 4095]), np.array([7]))
    for (xb, yb), rows in zip(data.micro_batches([first, second]), (first, second), strict=True):
        np.testing.assert_array_equal(xb.numpy(), x[rows])
        np.testing.assert_array_equal(yb.numpy(), y[rows])
    xb, yb = data.batch(first)
    assert xb.dtype == "float32" and yb.dtype == "int64" and tuple(xb.shape) == (3, 4096)


def test_oom_classification():
    backend = TensorFlowBackend()
    assert backend.is_oom(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert backend.is_oom(MemoryError())
    assert backend.is_oom(tf.errors.InternalError(None, None, "Failed: OOM when allocating tensor with shape"))
    assert not backend.is_oom(tf.errors.InvalidArgumentError(None, None, "shape mismatch"))
    assert not backend.is_oom(ValueError("OOM when allocating"))
    # Under a memory cap on the CPU some OOMs come wrapped or in other words; a probe must see them
    # as OOMs, not as errors that stop the study.
    assert backend.is_oom(tf.errors.AbortedError(None, None, "could not create a memory object"))

    class EncodeError(Exception):  # protobuf's, when serialising a traced graph fails to allocate
        pass

    try:
        try:
            raise EncodeError("Failed to serialize proto")
        except EncodeError as cause:
            raise TypeError("tf.function could not bind its inputs") from cause
    except TypeError as wrapped:
        assert backend.is_oom(wrapped)


@pytest.mark.slow
def test_importing_the_backend_prints_nothing():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", "import autobatch.backends.tensorflow.backend"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


@pytest.mark.slow
def test_a_large_micro_batch_runs_out_of_memory_in_training_under_a_real_budget():
    # TensorFlow 2.21's oneDNN convolution segfaults right after logging its OOM; the worker
    # finds "OOM when allocating" in the log and reports an OOM in training. Where the cap
    # strikes first in a C++ allocation outside TensorFlow's allocator (the batch handed to it
    # from numpy), the process aborts on std::bad_alloc: an OOM in training too.
    result = run_trial("synthetic-images", "tensorflow", TrialConfig(4096, 1, 1e-3), memory_budget="1.5GiB")
    assert result.status == "oom" and result.oom_phase == "train", result.error
    signatures = ("OOM when allocating", "ResourceExhausted", "std::bad_alloc")
    assert any(signature in result.error for signature in signatures), result.error
    assert result.memory_budget_bytes == int(1.5 * GIB)


@pytest.mark.slow
def test_a_small_micro_batch_fits_the_same_budget():
    result = run_trial(
        "synthetic-images",
        "tensorflow",
        TrialConfig(16, 1, 1e-3),
        memory_budget="1.5GiB",
        budget=TrialBudget(train_samples=512),
    )
    assert result.status == "ok", result.error
    assert result.samples_per_second > 0
    assert result.framework == "tensorflow"
    assert result.baseline_memory_bytes < result.peak_memory_bytes < 1.5 * GIB
    # Under a CPU budget the tensors come from malloc (which gives freed blocks back), not a pool
    assert result.extras["tensor_allocator"] == "malloc"


@pytest.mark.slow
def test_an_oom_in_evaluation_is_placed_in_eval():
    # Training at 8 fits in 640 MiB; one evaluation batch of all 512 validation images does not.
    result = run_trial(
        "synthetic-images",
        "tensorflow",
        TrialConfig(8, 1, 1e-3),
        memory_budget="640MiB",
        budget=TrialBudget(train_samples=64, eval_batch_size=512),
    )
    assert result.status == "oom" and result.oom_phase == "eval", result.error


@pytest.mark.slow
def test_micro_batching_saves_memory_for_real():
    # On the CPU the peak includes ~0.65 GiB of TensorFlow itself at every setting (64×4
    # vs 256×1 is 0.77 vs 1.04 GiB), so the windows here are large enough for activations
    # to dominate: about 1.3 MiB a sample on synthetic-images.
    budget = TrialBudget(train_samples=1024, warmup_steps=0, min_timed_steps=1)  # one window each
    micro = run_trial("synthetic-images", "tensorflow", TrialConfig(32, 32, 1e-3), budget=budget)
    whole = run_trial("synthetic-images", "tensorflow", TrialConfig(1024, 1, 1e-3), budget=budget)
    assert micro.status == whole.status == "ok", (micro.error, whole.error)
    assert micro.peak_memory_bytes <= 0.6 * whole.peak_memory_bytes
    # Same effective batch, same samples, same order: the same update up to float error.
    assert micro.val_loss == pytest.approx(whole.val_loss, rel=1e-4)


@pytest.mark.slow
# The CLI's tune is checked on PyTorch, TensorFlow's studies through tune() (tests/test_wall.py)
@pytest.mark.extended
def test_cli_tune_digits_cnn_on_tensorflow_recommends_a_feasible_config(run_cli, tmp_path):
    import json

    done = run_cli(
        "tune",
        "digits-cnn",
        "--backend",
        "tensorflow",
        "--trials",
        "8",
        "--samples",
        "1024",
        "--memory-budget",
        "2GiB",
        "--storage",
        f"sqlite:///{tmp_path}/tf.db",
        "--json",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    recommended = result["recommended"]
    assert recommended is not None
    assert recommended["peak_memory_bytes"] <= result["memory_budget_bytes"]
    assert result["n_trials"] == 8 and result["n_oom_trials"] == 0  # the probe's wall holds in the search
