"""A KerasTask on the TensorFlow backend: the compiled model's own loss (``compute_loss``, its regularisation
counted once per window), a fresh optimizer of the compiled class at the trial's learning rate, and
tf.data / PyDataset data of varying length, each micro-batch padded to its own longest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from autobatch import KerasTask, TrialBudget, TrialConfig, load_task  # noqa: E402
from autobatch.backends.base import TrialProgress  # noqa: E402
from autobatch.backends.tensorflow import MicroBatchTrainer, TensorFlowBackend, TensorFlowTrainingSession  # noqa: E402
from autobatch.backends.tensorflow._framework import keras, tf  # noqa: E402
from autobatch.backends.tensorflow.data import read_keras_data  # noqa: E402
from autobatch.core.adaptive import MicroBatchController  # noqa: E402
from autobatch.errors import InvalidParameterError  # noqa: E402
from tests import keras_task_tasks as tasks  # noqa: E402


def _window_loss_and_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)
    return loss, [tf.convert_to_tensor(gradient) for gradient in tape.gradient(loss, model.trainable_variables)]


def test_micro_batches_padded_to_their_own_longest_give_the_window_gradient_regularisation_included():
    keras.utils.set_random_seed(0)
    model = tasks.text_model(optimizer=keras.optimizers.SGD(0.1), regularization=0.5)
    data = read_keras_data("train_data", tasks.sequence_dataset(40, seed=4))
    window = np.argsort(data.sizes, kind="stable")[::4]  # 10 samples, shortest to longest
    x_window, y_window = data.batch(window)  # padded to the window's longest
    full_loss, full = _window_loss_and_gradients(model, x_window, y_window)

    trainer = MicroBatchTrainer(model, keras.optimizers.SGD(0.1), None, x_spec=data.spec[0], y_spec=data.spec[1])
    widths = []
    for start in range(0, 10, 4):  # 4, 4 and a short 2
        x, y = data.batch(window[start : start + 4])
        widths.append(int(x["tokens"].shape[1]))
        trainer.accumulate(x, y, tf.constant(len(y) / 10, tf.float32))
    assert widths[0] < widths[1] < widths[2] == x_window["tokens"].shape[1]  # each padded to its own longest
    for accumulated, expected, variable in zip(
        trainer.accumulated_gradients, full, model.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(
            accumulated.numpy(), np.asarray(expected), rtol=1e-5, atol=1e-6, err_msg=variable.path
        )
    assert trainer.trace_counts["accumulate"] == 1  # three lengths, one traced graph

    # The regularisation is in that gradient, once: counted 0 or 3 times, the kernel's would be off by its gradient.
    with tf.GradientTape() as tape:
        penalty = tf.add_n(model.losses)
    kernel = model.get_layer(index=3).kernel
    assert np.abs(tape.gradient(penalty, kernel).numpy()).max() > 1e-2
    assert float(trainer.apply()) == pytest.approx(float(full_loss), rel=1e-5)


def test_a_keras_task_trial_uses_the_compiled_adamw_at_the_trial_rate_and_measures_the_longest_sequences():
    task = load_task("tests.keras_task_tasks:text_task")
    backend = TensorFlowBackend()
    config, budget = TrialConfig(8, 2, 3e-2), TrialBudget(train_samples=4 * tasks.N_TRAIN, seed=1)
    with backend.trial_scope("cpu"):
        trial = backend.start_trial(task, config, budget, "cpu")
        optimizer = trial.trainer.optimizer
        assert type(optimizer).__name__ == "AdamW" and optimizer.weight_decay == pytest.approx(0.05)
        assert float(optimizer.learning_rate) == pytest.approx(3e-2)  # the trial's, not the compiled 1e-3
        assert trial.n_train == tasks.N_TRAIN and trial.longest_first()[0] == 0  # sample 0 is the longest
        # The first 7 validation samples, longest first, each weighing the same, in batches of 3.
        order = trial.val.evaluation_order(7)
        assert sorted(order) == list(range(7)) and list(trial.val.sizes[order]) == sorted(
            trial.val.sizes[:7], reverse=True
        )
        x, y = trial.val.batch(np.arange(7))
        expected = float(trial.trainer.model.compute_loss(x=x, y=y, y_pred=trial.trainer.model(x), training=False))
        assert trial.evaluate(3, 7) == pytest.approx(expected, rel=1e-5)

    result = backend.run_trial(task, config, budget, "cpu", TrialProgress())
    assert result.extras["optimizer"] == "AdamW"
    assert result.extras["worst_case_sample_size"] == tasks.LONGEST
    assert result.extras["traces"] == {"accumulate": 1, "apply": 1, "evaluate": 1}  # no retrace per length
    assert result.samples_trained == 4 * tasks.N_TRAIN
    assert result.val_loss < 0.6 * np.log(2)  # learns the majority token class


def test_a_py_dataset_task_trains():
    task = load_task("tests.keras_task_tasks:py_dataset_task")
    result = TensorFlowBackend().run_trial(
        task, TrialConfig(10, 2, 0.3), TrialBudget(train_samples=800, seed=0), "cpu", TrialProgress()
    )
    assert result.extras["optimizer"] == "SGD"
    assert "worst_case_sample_size" not in result.extras  # fixed-length rows: any window is the worst
    assert result.val_loss < 0.8 * np.log(2)


def test_an_uncompiled_model_is_refused_in_one_line_naming_model():
    task = load_task("tests.keras_task_tasks:uncompiled_task")
    with pytest.raises(InvalidParameterError) as caught:
        TensorFlowBackend().run_trial(
            task, TrialConfig(4, 1, 1e-3), TrialBudget(train_samples=8), "cpu", TrialProgress()
        )
    message = str(caught.value)
    assert caught.value.parameter == "model" and "\n" not in message
    assert "uncompiled Functional" in message and "call model.compile(optimizer=..., loss=...)" in message

    not_a_model = KerasTask(model=lambda: "model", train_data=task.train_data, val_data=task.val_data)
    with pytest.raises(InvalidParameterError, match=r"^model='a factory returning str' is invalid"):
        TensorFlowBackend().run_trial(
            not_a_model, TrialConfig(4, 1, 1e-3), TrialBudget(train_samples=8), "cpu", TrialProgress()
        )


@pytest.mark.parametrize("batched", ["padded_batch", "padded_batch then prefetch"])
def test_a_batched_pipeline_is_refused(batched):
    data = tasks.sequence_dataset(16, seed=0).padded_batch(4)
    if batched.endswith("prefetch"):  # behind another step: found by walking the pipeline
        data = data.prefetch(1)
    with pytest.raises(
        InvalidParameterError,
        match=r"^train_data='a (batched tf.data.Dataset|tf.data.Dataset batched upstream).*must be unbatched",
    ):
        task = KerasTask(model=tasks.text_model, train_data=data, val_data=tasks.sequence_dataset(8, seed=1))
        read_keras_data("train_data", task.train_data)


def test_padded_shapes_fix_the_padding_and_leave_no_size_to_vary():
    data = read_keras_data(
        "train_data",
        tasks.sequence_dataset(12, seed=0),
        padded_shapes=({"tokens": [tasks.LONGEST + 2]}, []),
        padding_value=-1,
    )
    x, _ = data.batch(np.array([1, 2]))
    assert x["tokens"].shape == (2, tasks.LONGEST + 2) and data.spec[0]["tokens"].shape.as_list() == [
        None,
        tasks.LONGEST + 2,
    ]
    assert int(x["tokens"][0, -1]) == -1 and data.sizes is None
    with pytest.raises(InvalidParameterError, match=r"^padded_shapes=.*is shorter than an element of train_data"):
        read_keras_data("train_data", tasks.sequence_dataset(12, seed=0), padded_shapes=({"tokens": [4]}, []))


def test_a_training_session_pads_each_micro_batch_and_a_split_window_gives_the_same_weights():
    task = dataclasses.replace(tasks.text_task(), model=lambda: tasks.text_model(optimizer=keras.optimizers.SGD(0.1)))
    window = np.argsort(-np.array([len(t) for t in tasks.sequences(tasks.N_TRAIN, 0)[0]]), kind="stable")[:12]

    def session(micro: int) -> TensorFlowTrainingSession:
        return TensorFlowTrainingSession(
            task,
            TrialConfig(micro, 1, 0.1),
            device="cpu",
            seed=3,
            mixed_precision=False,
            controller=MicroBatchController(micro),
        )

    whole, split = session(12), session(5)  # 12 vs 5, 5 and 2
    assert whole.n_train == split.n_train == tasks.N_TRAIN and split.optimizer_name == "SGD"
    assert split.run_window(window, epoch=1) == pytest.approx(whole.run_window(window, epoch=1), rel=1e-5)
    for a, b in zip(whole.model.trainable_weights, split.model.trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert np.isfinite(split.evaluate(16)) and split.evaluate(16) == pytest.approx(whole.evaluate(7), rel=1e-5)
