"""The PyTorch backend on a TorchTask: the user's datasets, collate function, loss and optimizer.

Gradient equivalence for a dict-batch model padded per micro-batch, a real trial with AdamW and a
custom loss, one-line errors for bad input, BatchNorm's micro-batch of one, worst-case windows
first when samples vary in size, and ``autobatch train``'s session over dataset indices.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from autobatch import TorchTask, TrialBudget, TrialConfig  # noqa: E402
from autobatch.backends.base import TrialProgress  # noqa: E402
from autobatch.backends.torch import TorchBackend, TorchTrainingSession, supervised_loss, train_window  # noqa: E402
from autobatch.backends.torch.adaptive import AdaptiveMicroBatcher  # noqa: E402
from autobatch.backends.torch.data import ArrayDataset, collate_for, device_batches  # noqa: E402
from autobatch.backends.torch.training import default_loss  # noqa: E402
from autobatch.core.adaptive import MicroBatchController  # noqa: E402
from autobatch.core.windows import Window  # noqa: E402
from autobatch.errors import InvalidParameterError  # noqa: E402
from tests import torch_task_tasks as tasks  # noqa: E402

CPU = torch.device("cpu")


class _NoStep(torch.optim.SGD):
    """Keeps the accumulated gradients after the window so the test can read them."""

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none=True):
        return None


def _gradients(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.fixture
def seen():
    tasks.SEEN.clear()
    tasks.RECORD["on"] = True
    yield tasks.SEEN
    tasks.RECORD["on"] = False
    tasks.SEEN.clear()


# -- (a) gradient equivalence: dict batches, each micro-batch padded to its own longest ----------------------


def test_micro_batches_padded_apart_give_the_full_windows_gradient():
    dataset = tasks.Sequences(11, seed=3, min_length=2, max_length=12)
    torch.manual_seed(0)
    model = tasks.TinyLM(dtype=torch.float64)
    window = np.arange(11)
    default_loss(model, tasks.pad_collate([dataset[i] for i in window])).backward()  # one batch, padded to 12
    full = _gradients(model)

    model.zero_grad(set_to_none=True)
    plan = Window(0, (window[0:4], window[4:8], window[8:10], window[10:11]))  # 4, 4, 2 and a short 1
    [(_, micro_batches)] = device_batches(dataset, tasks.pad_collate, [[plan]], TrialBudget(), CPU)
    widths = []

    def loss(model, batch):
        widths.append(batch["input_ids"].shape[1])
        return default_loss(model, batch)

    train_window(model, _NoStep(model.parameters(), lr=0.1), loss, micro_batches)
    lengths = [len(dataset[i]["input_ids"]) for i in window]
    assert widths == [max(lengths[a:b]) for a, b in ((0, 4), (4, 8), (8, 10), (10, 11))]  # padded apart
    assert len(set(widths)) > 1
    for accumulated, reference in zip(_gradients(model), full, strict=True):
        torch.testing.assert_close(accumulated, reference, rtol=1e-10, atol=1e-12)


# -- (b) a real trial: the user's optimizer and loss ------------------------------------------------------------


def test_a_trial_trains_with_the_tasks_adamw_and_its_own_loss():
    task = tasks.adamw_task()
    budget = TrialBudget(train_samples=512, seed=2, val_samples=48)
    result = TorchBackend().run_trial(task, TrialConfig(16, 2, 1e-2), budget, "cpu", TrialProgress())
    assert result.extras["optimizer"] == "AdamW"
    assert "min_micro_batch" not in result.extras and "worst_case_sample_size" not in result.extras
    # label smoothing 0.1 keeps the loss above ~0.2 even when every point is right; chance is ln 2
    assert 0.15 < result.val_loss < 0.6 * np.log(2)
    assert result.samples_per_second > 0


def test_a_trial_in_a_worker_loads_the_task_by_its_import_path():
    from autobatch import run_trial

    result = run_trial(
        "tests.torch_task_tasks:tiny_lm_task", None, TrialConfig(4, 2, 3e-3), budget=TrialBudget(train_samples=64)
    )
    assert result.status == "ok", result.error
    assert result.val_loss < np.log(tasks.VOCAB)


# -- (c) bad input: one line that names the parameter ------------------------------------------------------------


def _points_task(**fields) -> TorchTask:
    values = {"model": tasks.classifier, "train_data": tasks.Points(32, 0), "val_data": tasks.Points(8, 1), **fields}
    return TorchTask(**values)


def _trial_error(task, config=TrialConfig(8, 1, 1e-3)) -> str:
    with pytest.raises(InvalidParameterError) as caught:
        TorchBackend().run_trial(task, config, TrialBudget(train_samples=16), "cpu", TrialProgress())
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_model_factory_that_returns_no_module_is_named():
    message = _trial_error(_points_task(model=lambda: "not a model"))
    assert message == "model='not a model' is invalid: must be a callable returning a fresh torch.nn.Module"


def test_an_optimizer_factory_that_returns_no_optimizer_is_named():
    message = _trial_error(_points_task(optimizer=lambda parameters, lr: None))
    assert message.startswith("optimizer=None is invalid: must be a callable (parameters, lr)")


def test_a_loss_that_is_not_a_scalar_is_named_with_its_shape():
    def per_sample(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    message = _trial_error(_points_task(loss=per_sample))
    assert message.startswith("loss=a tensor of shape (8,) is invalid: must return a scalar tensor")


def test_a_collate_fn_that_fails_on_the_first_batch_is_named():
    def broken(samples):
        raise ValueError("cannot batch\nthese")

    message = _trial_error(_points_task(collate_fn=broken))
    assert message.startswith("collate_fn=")
    assert "broken (on the first 8 samples it raised ValueError: cannot batch these)" in message


def test_variable_length_samples_without_a_padding_collator_name_the_collate_fn():
    task = tasks.tiny_lm_task()
    task.collate_fn = None
    message = _trial_error(task)
    assert message.startswith("collate_fn=None, so default_collate, (on the first 8 samples it raised RuntimeError")
    assert "need a padding collate_fn" in message


def test_an_empty_dataset_is_refused_by_the_task():
    with pytest.raises(InvalidParameterError, match="^train_data='a dataset of 0 samples' is invalid"):
        _points_task(train_data=tasks.Points(0, 0))


# -- (d) BatchNorm: micro-batch 1 refused, a last micro-batch of one sample left out ----------------------------


def test_batch_norm_refuses_a_micro_batch_of_one_and_tells_the_search():
    message = _trial_error(tasks.batch_norm_task(), TrialConfig(1, 4, 1e-3))
    assert message.startswith("micro_batch_size=1 is invalid: must be >= 2 for a model with BatchNorm")
    # 9 samples in micro-batches of 4: the last holds one sample, which is left out, not a crash
    budget = TrialBudget(train_samples=9, warmup_steps=0, min_timed_steps=1)
    result = TorchBackend().run_trial(tasks.batch_norm_task(), TrialConfig(4, 3, 1e-3), budget, "cpu", TrialProgress())
    assert result.extras["min_micro_batch"] == 2
    assert np.isfinite(result.val_loss)


def test_a_one_sample_last_micro_batch_of_a_batch_norm_model_is_dropped_and_the_rest_weighted():
    torch.manual_seed(0)
    model = tasks.batch_norm_model().double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 2, (9,))
    loss = supervised_loss(torch.nn.functional.cross_entropy)
    micro = [(x[0:4], y[0:4]), (x[4:8], y[4:8]), (x[8:9], y[8:9])]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        train_window(model, _NoStep(model.parameters(), lr=0.1), loss, micro)  # what PyTorch does unasked
    model.zero_grad(set_to_none=True)
    train_window(model, _NoStep(model.parameters(), lr=0.1), loss, micro[:2])
    without_last = _gradients(model)
    model.zero_grad(set_to_none=True)
    train_window(model, _NoStep(model.parameters(), lr=0.1), loss, micro, min_micro_batch=2)
    for dropped, reference in zip(_gradients(model), without_last, strict=True):
        torch.testing.assert_close(dropped, reference, rtol=1e-10, atol=1e-12)


def test_the_adaptive_batcher_keeps_batch_norm_micro_batches_at_two_or_more():
    torch.manual_seed(0)
    with pytest.raises(InvalidParameterError, match="^micro_batch_size=1 is invalid"):
        AdaptiveMicroBatcher(tasks.batch_norm_model(), None, micro_batch_size=1)
    model = tasks.batch_norm_model()
    reference = tasks.batch_norm_model()
    reference.load_state_dict(model.state_dict())
    batcher = AdaptiveMicroBatcher(
        model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy, micro_batch_size=4
    )
    assert batcher.controller.min_micro_batch == 2  # halving after an OOM stops at 2
    x, y = torch.randn(9, 4), torch.randint(0, 2, (9,))
    batcher.step(x, y)  # 4, 4 and one sample left out
    other = AdaptiveMicroBatcher(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        micro_batch_size=4,
    )
    other.step(x[:8], y[:8])
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


# -- (e) samples of varying size: the longest window trains first, the longest validation batch first -----------


def test_the_first_window_holds_the_longest_samples(seen):
    task = tasks.tiny_lm_task()
    budget = TrialBudget(train_samples=32, val_samples=12, warmup_steps=0, min_timed_steps=1)
    result = TorchBackend().run_trial(task, TrialConfig(4, 2, 3e-3), budget, "cpu", TrialProgress())
    lengths = sorted((len(sample["input_ids"]) for sample in task.train_data.samples), reverse=True)
    assert result.extras["worst_case_sample_size"] == lengths[0]
    training = [entry for entry in seen if entry[0]]
    first_window = sorted([n for _, _, real in training[:2] for n in real], reverse=True)
    assert first_window == lengths[:8]
    assert training[0][1] == lengths[0]  # the first micro-batch is padded to the longest sample of all
    evaluation = [entry for entry in seen if not entry[0]]
    val_lengths = sorted((len(task.val_data[i]["input_ids"]) for i in range(12)), reverse=True)
    assert [n for _, _, real in evaluation[:2] for n in real] == val_lengths[:8]  # the worst eval batch first
    assert sum(len(real) for _, _, real in evaluation) == 12


# -- the training session: windows of dataset indices ---------------------------------------------------------


def test_a_session_redoes_an_oom_window_by_indices_each_micro_batch_padded_to_its_own_longest(seen, monkeypatch):
    task = tasks.tiny_lm_task()
    controller = MicroBatchController(4, grow_after=None)
    session = TorchTrainingSession(
        task, TrialConfig(4, 2, 3e-3), device="cpu", seed=0, mixed_precision=False, controller=controller
    )
    assert session.n_train == 64 and type(session.optimizer).__name__ == "AdamW"
    forward = session.model.forward
    failed = []

    def fails_once_at_four(input_ids, attention_mask, labels=None):
        if len(input_ids) == 4 and not failed:
            failed.append(True)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return forward(input_ids, attention_mask, labels)

    monkeypatch.setattr(session.model, "forward", fails_once_at_four)
    indices = np.array([5, 1, 9, 3, 7, 2, 8, 0])
    loss = session.run_window(indices, epoch=1)
    assert np.isfinite(loss) and controller.micro_batch_size == 2
    [adaptation] = controller.adaptations
    assert (adaptation.old_micro_batch, adaptation.new_micro_batch) == (4, 2)
    lengths = [len(task.train_data[i]["input_ids"]) for i in indices]
    widths = [width for training, width, _ in seen if training]
    assert widths == [max(lengths[i : i + 2]) for i in range(0, 8, 2)]
    value = session.evaluate(5)
    assert np.isfinite(value)
    assert session.model.training


def test_a_session_trains_a_workload_as_before():
    from autobatch import load_workload

    workload = load_workload("digits-mlp")
    controller = MicroBatchController(16)
    session = TorchTrainingSession(
        workload, TrialConfig(16, 2, 3e-3), device="cpu", seed=0, mixed_precision=False, controller=controller
    )
    assert isinstance(session.parts.train_set, ArrayDataset)  # arrays keep the whole-micro-batch fetch
    assert collate_for(session.parts.train_set, None)(("x", "y")) == ("x", "y")
    before = session.evaluate(64)
    rng = np.random.default_rng(0)
    for _ in range(20):
        session.run_window(rng.choice(session.n_train, 32, replace=False), epoch=1)
    assert session.evaluate(64) < before


# -- data: any batch structure reaches the device; arrays keep their fast path unless a collate_fn is given ------


def test_every_tensor_of_a_batch_reaches_the_device_in_its_own_structure():
    from collections import UserDict, namedtuple

    from autobatch.backends.torch.data import to_device

    class Encoding(UserDict):
        """A mapping whose constructor takes more than a dict, as transformers' BatchEncoding."""

        def __init__(self, data, tensor_type=None):
            super().__init__(data)
            self.tensor_type = tensor_type

    Pair = namedtuple("Pair", "inputs target")
    batch = Pair(Encoding({"ids": torch.ones(2, 3), "extra": [torch.zeros(2), 7]}, tensor_type="pt"), torch.ones(2))
    moved = to_device(batch, torch.device("meta"))
    assert type(moved) is Pair and type(moved.inputs) is Encoding and moved.inputs.tensor_type == "pt"
    assert moved.inputs["ids"].is_meta and moved.inputs["extra"][0].is_meta and moved.target.is_meta
    assert moved.inputs["extra"][1] == 7 and not batch.target.is_meta


def test_arrays_are_fetched_whole_without_a_collate_fn_and_sample_by_sample_with_one():
    from autobatch.backends.torch.data import fetch
    from autobatch.backends.torch.task import build

    x, y = np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6)
    plain = build(TorchTask(model=tasks.classifier, train_data=(x, y), val_data=(x, y)), 1e-3, CPU)
    assert isinstance(plain.train_set, ArrayDataset)
    xb, yb = fetch(plain.train_set, np.array([4, 1]), plain.train_collate)
    assert xb.tolist() == [[8.0, 9.0], [2.0, 3.0]] and yb.tolist() == [4, 1]

    def listing(samples):
        return [int(target) for _, target in samples]

    task = TorchTask(model=tasks.classifier, train_data=(x, y), val_data=(x, y), collate_fn=listing)
    parts = build(task, 1e-3, CPU)
    assert fetch(parts.train_set, np.array([4, 1]), parts.train_collate) == [4, 1]
