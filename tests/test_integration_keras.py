"""A recommendation applied to a real Keras ``fit``, and an OOM under a real memory budget adapted
without changing the effective batch.

The budget is real (``RLIMIT_DATA`` in a child process) and so is the failure: the model's
``Activations`` layer asks numpy, inside the traced step (``py_function``), for memory in
proportion to its micro-batch, as a layer's activations take it, and that allocation fails
against the limit, which TensorFlow raises as ``ResourceExhaustedError`` from the step. It is
numpy's allocation rather than a kernel's: under a CPU limit TensorFlow's own allocator waits
10 s before it gives up, or its oneDNN kernels kill the process (see tests/test_adaptive.py);
this fails at once and the same way every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from autobatch.backends.tensorflow._framework import keras, tf  # noqa: E402
from autobatch.core.adaptive import MicroBatchOOMError  # noqa: E402
from autobatch.errors import InvalidParameterError  # noqa: E402
from autobatch.integrations import Recommendation  # noqa: E402
from autobatch.integrations.keras import fit  # noqa: E402

MIB = 2**20
N_TRAIN = 64
PER_SAMPLE_BYTES = 64 * MIB  # the "activations" of one sample: 16 samples take 1 GiB, 8 take 512 MiB
BUDGET_ABOVE_NOW = 768 * MIB  # the limit above what the process holds then (it grows ~60 MiB as it traces the run)
MARKED = 40  # a sample of the second window: the OOM strikes after the epoch's first optimizer step
# Armed from the second epoch (_arm): the first runs whole at the large micro-batch.
state: dict = {"armed": False, "sizes": [], "fail_above": None}


def _allocate(size, marked):
    size = int(size)
    state["sizes"].append(size)
    if state["armed"] and bool(marked):
        if state["fail_above"] is None:
            np.empty(size * PER_SAMPLE_BYTES, dtype=np.uint8)  # past RLIMIT_DATA: numpy's MemoryError
        elif size > state["fail_above"]:
            np.empty(size << 50, dtype=np.uint8)  # no machine has that much: numpy's MemoryError
    return np.float32(0.0)


class Activations(keras.layers.Layer):
    def call(self, x, training=False):
        if not training:
            return x
        zero = tf.py_function(_allocate, [tf.shape(x)[0], tf.reduce_any(x[:, 0] > 5.0)], tf.float32)
        zero.set_shape(())
        return x + zero


def _data(samples=N_TRAIN):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 4)).astype(np.float32)
    y = (x[:, 1] + 0.5 * x[:, 2] > 0).astype(np.int64)
    x[:, 0] = np.clip(x[:, 0], -3, 3)
    x[MARKED, 0] = 9.0
    return x, y


def _model(learning_rate=0.5):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(16, activation="tanh")(Activations()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _max_difference(a, b) -> float:
    return max(float(np.abs(wa.numpy() - wb.numpy()).max()) for wa, wb in zip(a.weights, b.weights, strict=True))


def test_fit_takes_the_micro_batch_accumulation_and_learning_rate():
    x, y = _data()
    recommendation = Recommendation(micro_batch_size=4, accumulation_steps=4, learning_rate=0.05, eval_batch_size=32)
    model = _model()
    optimizer = model.optimizer
    evaluated: list[int] = []
    count = keras.callbacks.LambdaCallback(on_test_batch_end=lambda batch, logs: evaluated.append(batch))
    state["sizes"].clear()
    history = fit(model, x, y, recommendation=recommendation, epochs=2, shuffle=False, verbose=0, callbacks=[count],
                  validation_data=(x[:40], y[:40]))  # fmt: skip

    assert state["sizes"] == [4] * (2 * N_TRAIN // 4)  # every training step saw one micro-batch
    assert model.optimizer is optimizer  # not built before: set in place
    assert optimizer.gradient_accumulation_steps == 4
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    assert int(optimizer.iterations.numpy()) == 2 * N_TRAIN // 16  # optimizer steps: samples / effective batch
    assert len(evaluated) == 2 * 2  # 40 validation samples in batches of the recommended eval size, 32
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 2 and history.adaptations == []

    # Keras averages the micro-batches of a window: the same run as one batch of 16 per step.
    reference = _model(learning_rate=0.05)
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert _max_difference(model, reference) < 1e-5

    # A built optimizer is rebuilt with its settings and state: momentum, step count.
    fit(model, x, y, recommendation=Recommendation(8, 2, 0.02), shuffle=False, verbose=0)
    rebuilt = model.optimizer
    assert rebuilt is not optimizer and type(rebuilt) is type(optimizer)
    assert rebuilt.gradient_accumulation_steps == 2 and rebuilt.get_config()["momentum"] == 0.9
    assert int(rebuilt.iterations.numpy()) == 2 * N_TRAIN // 16 + N_TRAIN // 16
    assert float(rebuilt.learning_rate.numpy()) == pytest.approx(0.02)

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(InvalidParameterError, match=r"^x=.*add \.batch\(n\)"):
        fit(_model(), dataset, recommendation=recommendation)
    state["sizes"].clear()
    fit(_model(), dataset.batch(10), recommendation=recommendation, verbose=0, shuffle=False)
    assert state["sizes"] == [4] * (N_TRAIN // 4)  # a batched dataset is re-cut to the micro-batch
    with pytest.raises(InvalidParameterError, match="^batch_size=16 is invalid"):
        fit(_model(), x, y, recommendation=recommendation, batch_size=16)
    scheduled = _model()
    scheduled.optimizer.learning_rate = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    with pytest.raises(InvalidParameterError, match="keep_learning_rate=True"):
        fit(scheduled, x, y, recommendation=recommendation)


def _arm():
    return keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: state.update(armed=epoch >= 1))


def test_a_window_begun_in_the_last_epoch_is_carried_through_the_redo(monkeypatch):
    # 48 samples at an effective batch of 32: epoch 2 begins half-way through a window, and its redo at
    # micro-batch 8 takes over that half window's gradient (scaled to 8s) and micro-step count.
    # Without a budget here, micro-batches over 8 ask for petabytes.
    monkeypatch.setitem(state, "fail_above", 8)
    x, y = _data(48)
    options = dict(epochs=2, shuffle=False, verbose=0, callbacks=[_arm()])
    small, adapted = _model(), _model()
    with pytest.warns(UserWarning, match="not a multiple of the effective batch 32"):
        fit(small, x, y, recommendation=Recommendation(8, 4, 0.1), **options)
        history = fit(adapted, x, y, recommendation=Recommendation(16, 2, 0.1), **options)
    [adaptation] = history.adaptations
    assert (adaptation["epoch"], adaptation["step"], adaptation["new_micro_batch"]) == (2, 2, 8)
    assert int(adapted.optimizer.iterations.numpy()) == int(small.optimizer.iterations.numpy()) == 3
    assert _max_difference(adapted, small) < 1e-5

    split = r"micro-batch of 16 .*cannot be split further \(min_micro_batch=16\)"
    with pytest.raises(MicroBatchOOMError, match=split), pytest.warns(UserWarning, match="not a multiple"):
        fit(_model(), x, y, recommendation=Recommendation(16, 2, 0.1), min_micro_batch=16, **options)


def _run_under_budget() -> None:
    """In the child: a reference run at the small micro-batch, then a run that starts large under the budget."""
    import resource

    tf.config.threading.set_intra_op_parallelism_threads(1)  # this tiny model is fastest on one
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x, y = _data()
    options = dict(epochs=3, shuffle=False, verbose=0, callbacks=[_arm()])
    small = _model()
    reference = fit(small, x, y, recommendation=Recommendation(8, 4, 0.1), **options)
    state["sizes"].clear()

    with open("/proc/self/status") as status:
        data_bytes = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (data_bytes + BUDGET_ABOVE_NOW, hard))
    adapted = _model()
    history = fit(adapted, x, y, recommendation=Recommendation(16, 2, 0.1), **options)
    print(
        json.dumps(
            {
                "adaptations": history.adaptations,
                "loss": history.history["loss"],
                "reference_loss": reference.history["loss"],
                "sizes": state["sizes"],
                "steps": int(adapted.optimizer.iterations.numpy()),
                "accumulation": adapted.optimizer.gradient_accumulation_steps,
                "max_difference": _max_difference(adapted, small),
            }
        )
    )


def test_an_oom_under_a_memory_budget_halves_the_micro_batch_and_keeps_the_effective_batch():
    done = subprocess.run(
        [sys.executable, "-c", "from tests.test_integration_keras import _run_under_budget as run; run()"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    [adaptation] = result["adaptations"]
    assert (adaptation["old_micro_batch"], adaptation["old_accumulation"]) == (16, 2)
    assert (adaptation["new_micro_batch"], adaptation["new_accumulation"]) == (8, 4)
    assert adaptation["effective_batch_size"] == 32 and adaptation["cause"] == "oom"
    assert (adaptation["epoch"], adaptation["step"]) == (2, 3)  # epoch 2 redone from its first step
    assert "Unable to allocate" in adaptation["detail"] or "OOM" in adaptation["detail"], adaptation["detail"]
    # Epoch 1 at 16; epoch 2's first window (two micro-batches) and the failing one, then all at 8.
    assert result["sizes"] == [16] * 4 + [16] * 3 + [8] * 8 + [8] * 8
    assert result["steps"] == 3 * N_TRAIN // 32 and result["accumulation"] == 4  # optimizer steps: 2 an epoch
    # The undone step left nothing behind: the weights and losses of a run at 8 x 4 from the start.
    assert result["max_difference"] < 1e-5
    np.testing.assert_allclose(result["loss"], result["reference_loss"], rtol=1e-5)
    assert result["loss"][-1] < result["loss"][0]
