"""PyTorch: the optimizer, the LR scheduler and AMP's GradScaler step once per window, not per micro-batch.

A window of k micro-batches is one optimizer step; so is one ``scheduler.step()`` and one
``scaler.step()`` + ``scaler.update()``. Stepping any of them per micro-batch would train
with the wrong learning rate, or unscale and check partial gradients. On the CPU,
:class:`MixedPrecision` autocasts to bfloat16 and has no scaler (bfloat16 has float32's
range); the scaler is CUDA's. Its logic is the same on the CPU (``torch.amp.GradScaler("cpu")``),
so these tests give a CPU MixedPrecision a real CPU scaler: its scale doubles at each
update (``growth_interval=1``), so the scale itself counts the updates, and an inf in one
micro-batch must skip the whole window's step, once. The GPU test counts the steps and
updates of the scaler MixedPrecision makes on CUDA, and compares with float32 full batches.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from autobatch.backends.torch import AdaptiveMicroBatcher, MixedPrecision, supervised_loss, train_window  # noqa: E402

INIT_SCALE = 2.0**10
WINDOWS = 3
WINDOW = 12
MICRO = 3  # 4 micro-batches per window


def _windows(seed: int = 1, poison: tuple[int, int] | None = None):
    """WINDOWS windows of WINDOW samples; ``poison=(window, sample)`` puts an inf in one sample."""
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for index in range(WINDOWS):
        x = torch.randn(WINDOW, 5, generator=generator)
        y = torch.randint(0, 3, (WINDOW,), generator=generator)
        if poison is not None and poison[0] == index:
            x[poison[1], 0] = float("inf")
        windows.append((x, y))
    return windows


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _split(x, y, micro: int):
    return [(x[start : start + micro], y[start : start + micro]) for start in range(0, len(y), micro)]


class CountingScaler(torch.amp.GradScaler):
    """A real CPU GradScaler that also counts how often it steps and updates."""

    def __init__(self):
        super().__init__("cpu", init_scale=INIT_SCALE, growth_interval=1)
        self.steps = 0
        self.updates = 0

    def step(self, optimizer, *args, **kwargs):
        self.steps += 1
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.updates += 1
        return super().update(new_scale)


def _scaled_precision() -> MixedPrecision:
    """MixedPrecision's scaler path on the CPU: float32 compute (no autocast), a real GradScaler."""
    precision = MixedPrecision(torch.device("cpu"), enabled=False)
    precision.scaler = CountingScaler()
    return precision


def _train(micro: int, *, scaled: bool, poison=None, with_scheduler: bool = True):
    """Train WINDOWS windows with ``train_window``; returns (model, optimizer, scheduler, precision, snapshots)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if with_scheduler else None
    precision = _scaled_precision() if scaled else None
    snapshots = []
    for x, y in _windows(poison=poison):
        train_window(
            model,
            optimizer,
            supervised_loss(torch.nn.functional.cross_entropy),
            _split(x, y, micro),
            precision=precision,
            scheduler=scheduler,
        )
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return model, optimizer, scheduler, precision, snapshots


def _assert_same_weights(a, b):
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_the_scheduler_steps_once_per_window_and_matches_full_batch_windows():
    accumulated, optimizer, scheduler, _, _ = _train(MICRO, scaled=False)
    full, _, _, _, _ = _train(WINDOW, scaled=False)
    # One scheduler step per window: lr 0.2 halved three times (per micro-batch it would be 0.2 / 2**12).
    assert scheduler.last_epoch == WINDOWS
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**WINDOWS)
    _assert_same_weights(accumulated, full)  # the same schedule as one full-batch step per window


def test_the_scaler_steps_and_updates_once_per_window_and_unscales_once():
    accumulated, _, scheduler, precision, _ = _train(MICRO, scaled=True)
    scaler = precision.scaler
    assert (scaler.steps, scaler.updates) == (WINDOWS, WINDOWS)
    # The scale grows at every update without an inf: it counts the updates too.
    assert scaler.get_scale() == INIT_SCALE * 2**WINDOWS
    assert scheduler.last_epoch == WINDOWS
    # Scaled by 2**10.. and unscaled once before each step: the weights of unscaled full-batch windows.
    full, _, _, _, _ = _train(WINDOW, scaled=False)
    _assert_same_weights(accumulated, full)


def test_an_inf_in_one_micro_batch_skips_the_whole_window_once():
    # The inf is in the last micro-batch of window 2: the three before it must not step either.
    _, _, _, precision, snapshots = _train(MICRO, scaled=True, poison=(1, WINDOW - 1))
    scaler = precision.scaler
    for before, after in zip(snapshots[0], snapshots[1], strict=True):
        assert torch.equal(before, after)  # window 2 changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True))  # window 3 stepped
    # grew after window 1, backed off once (not once per micro-batch) after window 2, grew after window 3
    assert scaler.get_scale() == INIT_SCALE * 2 * 0.5 * 2
    assert (scaler.steps, scaler.updates) == (WINDOWS, WINDOWS)


def test_the_adaptive_batcher_steps_scaler_and_scheduler_once_per_window_even_when_it_redoes_one():
    class FailsOnce(torch.nn.Module):
        """Runs out of memory once, in the second micro-batch of the second window, at 6 samples."""

        def __init__(self):
            super().__init__()
            self.inner = _model()
            self.calls = 0
            self.failed = False

        def forward(self, x):
            self.calls += 1
            if not self.failed and len(x) == 6 and self.calls == 4:
                self.failed = True
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
            return self.inner(x)

    model = FailsOnce()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    precision = _scaled_precision()
    batcher = AdaptiveMicroBatcher(
        model,
        optimizer,
        torch.nn.functional.cross_entropy,
        micro_batch_size=6,
        grow_after=None,
        precision=precision,
        scheduler=scheduler,
    )
    for x, y in _windows():
        batcher.step(x, y)
    [adaptation] = batcher.adaptations
    assert (adaptation.step, adaptation.old_micro_batch, adaptation.new_micro_batch) == (2, 6, 3)
    # The failed attempt neither stepped nor moved the schedule or the scale.
    assert scheduler.last_epoch == WINDOWS
    assert (precision.scaler.steps, precision.scaler.updates) == (WINDOWS, WINDOWS)
    assert precision.scaler.get_scale() == INIT_SCALE * 2**WINDOWS
    full, _, _, _, _ = _train(WINDOW, scaled=False)
    _assert_same_weights(model.inner, full)


@pytest.mark.gpu
def test_on_cuda_mixed_precision_scales_once_per_window():
    from tests.conftest import has_cuda

    if not has_cuda():
        pytest.skip("needs CUDA")
    device = torch.device("cuda:0")
    precision = MixedPrecision(device, enabled=True)
    assert precision.scaler is not None and precision.dtype == torch.float16
    scaler = precision.scaler
    calls = {"step": 0, "update": 0}
    for name in calls:  # count the calls on this scaler, CUDA's own
        method = getattr(scaler, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(scaler, name, counted)
    start = scaler.get_scale()
    model = _model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for x, y in _windows():
        micro_batches = [(xb.to(device), yb.to(device)) for xb, yb in _split(x, y, MICRO)]
        train_window(
            model,
            optimizer,
            supervised_loss(torch.nn.functional.cross_entropy),
            micro_batches,
            precision=precision,
            scheduler=scheduler,
        )
    assert calls == {"step": WINDOWS, "update": WINDOWS}
    assert scheduler.last_epoch == WINDOWS
    assert scaler.get_scale() == start  # no inf, no backoff (it grows only after 2000 clean steps)
    full, _, _, _, _ = _train(WINDOW, scaled=False)
    for pa, pb in zip(model.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(pa.cpu(), pb, rtol=2e-2, atol=2e-3)  # float16 compute
