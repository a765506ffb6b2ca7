import numpy as np
import pytest

torch = pytest.importorskip("torch")

from autobatch import TrialBudget, TrialConfig, load_workload  # noqa: E402
from autobatch.backends.base import TrialProgress  # noqa: E402
from autobatch.backends.torch import ArrayDataset, TorchBackend, evaluate, supervised_loss, train_window  # noqa: E402
from autobatch.backends.torch.training import make_loss  # noqa: E402


def _model_and_batch(seed=0, n=10):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def _gradients(model):
    return [p.grad.detach().clone() for p in model.parameters()]


class _NoStep(torch.optim.SGD):
    """Keeps gradients after the window so the test can read them."""

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none=True):
        return None


def test_accumulated_gradient_equals_full_batch_gradient_with_short_last_micro_batch():
    loss_fn = supervised_loss(make_loss("cross_entropy"))
    model, x, y = _model_and_batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    full = _gradients(model)

    model.zero_grad()
    micro = [(x[0:4], y[0:4]), (x[4:8], y[4:8]), (x[8:10], y[8:10])]  # 4, 4 and a short 2
    train_window(model, _NoStep(model.parameters(), lr=0.1), loss_fn, micro)
    for accumulated, reference in zip(_gradients(model), full, strict=True):
        torch.testing.assert_close(accumulated, reference, rtol=1e-10, atol=1e-12)


def test_unweighted_accumulation_would_be_wrong():
    # Guards the test above: averaging micro-batch means equally gives a different gradient.
    model, x, y = _model_and_batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    full = _gradients(model)
    model.zero_grad()
    for xb, yb in [(x[0:4], y[0:4]), (x[4:8], y[4:8]), (x[8:10], y[8:10])]:
        (torch.nn.functional.cross_entropy(model(xb), yb) / 3).backward()
    assert any(not torch.allclose(a, b) for a, b in zip(_gradients(model), full, strict=True))


def test_one_window_equals_one_full_batch_step():
    loss_fn = supervised_loss(make_loss("cross_entropy"))
    model_a, x, y = _model_and_batch(seed=1, n=13)
    model_b, _, _ = _model_and_batch(seed=1, n=13)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.5, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.5, momentum=0.9)
    train_window(model_a, opt_a, loss_fn, [(x, y)])
    train_window(model_b, opt_b, loss_fn, [(x[i : i + 5], y[i : i + 5]) for i in range(0, 13, 5)])
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model_b.parameters())  # zeroed once per window


def test_trial_in_process_is_repeatable_and_learns():
    backend = TorchBackend()
    workload = load_workload("digits-mlp")
    budget = TrialBudget(train_samples=1024, seed=5)
    config = TrialConfig(32, 2, 3e-3)
    first = backend.run_trial(workload, config, budget, "cpu", TrialProgress())
    second = backend.run_trial(workload, config, budget, "cpu", TrialProgress())
    assert first.val_loss == pytest.approx(second.val_loss, rel=1e-6)
    assert first.val_loss < np.log(10) * 0.8  # better than chance after 1024 samples
    assert first.samples_per_second > 0 and first.steps_timed >= budget.min_timed_steps


def test_extra_windows_keep_throughput_measurable_when_the_budget_is_one_window():
    backend = TorchBackend()
    result = backend.run_trial(
        load_workload("digits-mlp"), TrialConfig(256, 4, 1e-3), TrialBudget(train_samples=512), "cpu", TrialProgress()
    )
    assert result.steps_timed == 2 and result.samples_per_second > 0


def test_evaluate_weights_every_sample_equally():
    model, x, y = _model_and_batch(n=10)
    reference = float(torch.nn.functional.cross_entropy(model(x), y).detach())
    dataset = ArrayDataset(x.numpy(), y.numpy())
    for batch in (3, 4, 10):
        value = evaluate(model, supervised_loss(make_loss("cross_entropy")), dataset, batch, torch.device("cpu"))
        assert value == pytest.approx(reference, rel=1e-9)
    first = float(torch.nn.functional.cross_entropy(model(x[:7]), y[:7]).detach())
    assert evaluate(model, supervised_loss(make_loss("cross_entropy")), dataset, 3, torch.device("cpu"), limit=7) == (
        pytest.approx(first, rel=1e-9)
    )


def test_oom_classification():
    backend = TorchBackend()
    assert backend.is_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert backend.is_oom(MemoryError())
    assert backend.is_oom(RuntimeError("could not create a primitive"))  # oneDNN under the cap
    assert not backend.is_oom(RuntimeError("shape mismatch"))
