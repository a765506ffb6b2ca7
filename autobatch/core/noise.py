"""The gradient noise scale, from gradients a window of micro-batches computes anyway.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training": with G the true
gradient and Σ the per-sample gradient covariance, a mean gradient over B samples has
E|G_B|² = |G|² + tr(Σ)/B. A window of k micro-batches of b samples holds gradients at two
batch sizes: each micro-batch's (B_small = b) and the window's (B_big = k·b). Two
equations, two unknowns:

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Both are unbiased per window but noisy; each is averaged over windows before their
ratio B_simple = tr(Σ)/|G|² is taken (a ratio of noisy numbers is biased). B_simple is
the batch size past which a larger batch stops cutting the number of steps: the
critical batch size. It also gives statistical efficiency (Pollux/AdaptDL's goodput)
and AdaScale's learning-rate gain, below. Framework-free: backends hand in squared norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class NoiseScaleEstimator:
    """Averages the two-batch-size estimates of |G|² and tr(Σ) over a trial's windows."""

    def __init__(self) -> None:
        self.windows = 0
        self.skipped_windows = 0
        self._grad_sq_sum = 0.0
        self._trace_sum = 0.0
        self._batch_sizes: tuple[int, int] | None = None

    def add_window(self, micro_batch_size: int, window_size: int, micro_sq_norm: float, window_sq_norm: float) -> None:
        """One window: its micro-batch size, its size, the mean of its micro-batch gradients'
        squared norms and its own gradient's squared norm (each gradient of a mean loss).

        Windows whose micro-batches differ in size (a short last one) are left out by the
        caller; windows with a non-finite norm (an overflowing mixed-precision step) here.
        """
        if window_size <= micro_batch_size:
            raise ValueError(f"window_size={window_size} must exceed micro_batch_size={micro_batch_size}")
        if not (math.isfinite(micro_sq_norm) and math.isfinite(window_sq_norm)):
            self.skipped_windows += 1
            return
        self._add(micro_batch_size, window_size, 1, micro_sq_norm, window_sq_norm)

    def add_windows(
        self,
        micro_batch_size: int,
        window_size: int,
        windows: int,
        skipped_windows: int,
        micro_sq_norm_sum: float,
        window_sq_norm_sum: float,
    ) -> None:
        """``windows`` windows of one size at once, from the sums of their two norms (as :meth:`add_window`
        takes them), and ``skipped_windows`` more left out for a non-finite norm.

        Each window's two estimates are linear in its norms, so their sum over the windows is the
        estimates of the summed norms: exactly what adding the windows one by one gives, for a backend
        that sums the norms on the device and reads them once, at the end of a trial.
        """
        if windows < 0 or skipped_windows < 0:
            raise ValueError(f"windows={windows} and skipped_windows={skipped_windows} must be >= 0")
        self.skipped_windows += skipped_windows
        if windows == 0:
            return
        if window_size <= micro_batch_size:
            raise ValueError(f"window_size={window_size} must exceed micro_batch_size={micro_batch_size}")
        if not (math.isfinite(micro_sq_norm_sum) and math.isfinite(window_sq_norm_sum)):
            self.skipped_windows += windows
            return
        self._add(micro_batch_size, window_size, windows, micro_sq_norm_sum, window_sq_norm_sum)

    def _add(self, micro_batch_size: int, window_size: int, windows: int, micro_sq: float, window_sq: float) -> None:
        small, big = float(micro_batch_size), float(window_size)
        self._grad_sq_sum += (big * window_sq - small * micro_sq) / (big - small)
        self._trace_sum += (micro_sq - window_sq) / (1.0 / small - 1.0 / big)
        self.windows += windows
        self._batch_sizes = (micro_batch_size, window_size)

    @property
    def grad_sq(self) -> float | None:
        """|G|², averaged over the windows."""
        return self._grad_sq_sum / self.windows if self.windows else None

    @property
    def trace(self) -> float | None:
        """tr(Σ), averaged over the windows."""
        return self._trace_sum / self.windows if self.windows else None

    @property
    def noise_scale(self) -> float | None:
        """B_simple; None without windows, or when the noise swamps the gradient (see :func:`noise_scale_from`)."""
        if not self.windows:
            return None
        return noise_scale_from(self.grad_sq, self.trace)

    def summary(self) -> dict:
        """Plain values for a TrialResult; {} when no window was measured."""
        if not self.windows and not self.skipped_windows:
            return {}
        micro, window = self._batch_sizes or (None, None)
        return {
            "b_simple": self.noise_scale,
            "grad_sq": self.grad_sq,
            "trace": self.trace,
            "windows": self.windows,
            "skipped_windows": self.skipped_windows,
            "micro_batch_size": micro,
            "window_size": window,
        }


class MeasuringBudget:
    """Which windows a trial measures the noise on, so that measuring costs at most ``share`` of its training time.

    PyTorch's norms cost a call per parameter and micro-batch (gradient hooks), which it times;
    TensorFlow's run inside the traced step, where nothing can time them apart, so it times the same
    norms in a traced call of their own (:meth:`MicroBatchTrainer.norm_seconds`). The first two
    windows are measured and not counted (setting up makes them slow). After them a window is
    measured while measuring's windows × what one costs stay within ``share`` of the windows ×
    what one takes without it. Where the norms cost little next to a window (a model of any size,
    or on a GPU) every window is measured; where they do not (a small model whose micro-batch takes
    a millisecond or less, and whose per-parameter norms then cost some percent of it) every few
    windows are. Which windows are measured depends on time, never on a gradient, so each
    estimate of |G|² and tr(Σ) stays unbiased; fewer windows only make it noisier.

    Both costs are the least seen: the work is the same every window and only a wait adds to it,
    so on a shared machine a preempted window neither stops the measuring (a wait charged to it)
    nor lets it run over (a loaded machine's slow windows, which measuring would be weighed against).
    """

    WARMUP_WINDOWS = 2

    def __init__(self, share: float = 0.005):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share={share} must be in (0, 1]")
        self.share = share
        self.windows = 0
        self.measured_windows = 0  # after the warm-up
        self.window_cost: float | None = None  # measuring a window (after the first, which sets up)
        self.window_seconds: float | None = None  # a window, measuring left out (after the warm-up)

    @property
    def measuring_seconds(self) -> float:
        """What measuring has cost after the warm-up."""
        return (self.window_cost or 0.0) * self.measured_windows

    @property
    def training_seconds(self) -> float:
        """What the windows after the warm-up took, measuring left out."""
        return (self.window_seconds or 0.0) * (self.windows - self.WARMUP_WINDOWS)

    def due(self) -> bool:
        """Whether the next window should be measured."""
        if self.windows < self.WARMUP_WINDOWS:
            return True
        return self.measuring_seconds <= self.share * self.training_seconds

    def window_done(self, seconds: float, measuring_seconds: float | None = None) -> None:
        """A window took ``seconds``, of which measuring took ``measuring_seconds`` (``None``: not measured)."""
        if measuring_seconds is not None and self.windows > 0:
            self.window_cost = min(measuring_seconds, self.window_cost or math.inf)
        if self.windows >= self.WARMUP_WINDOWS:
            self.measured_windows += measuring_seconds is not None
            training = max(0.0, seconds - (measuring_seconds or 0.0))
            self.window_seconds = min(training, self.window_seconds or math.inf)
        self.windows += 1


def noise_scale_from(grad_sq: float | None, trace: float | None) -> float | None:
    """tr(Σ)/|G|², clamped at 0; None when |G|² is estimated at or below 0.

    An estimate of |G|² at or below zero means the gradient is too small next to its
    noise for these batch sizes to resolve: the noise scale is larger than they can
    measure, and the callers below treat it as unbounded.
    """
    if grad_sq is None or trace is None or not grad_sq > 0:
        return None
    return max(trace, 0.0) / grad_sq


def pooled_noise_scale(summaries: Iterable[dict]) -> dict | None:
    """One estimate from several trials' :meth:`NoiseScaleEstimator.summary`, weighted by windows.

    Like the windows within a trial, |G|² and tr(Σ) are averaged before their ratio.
    Returns the estimate, how many trials and windows it pools, and the per-trial range.
    """
    grad_sq = trace = 0.0
    windows = trials = 0
    per_trial = []
    for summary in summaries:
        count = int(summary.get("windows") or 0)
        if count == 0 or summary.get("grad_sq") is None or summary.get("trace") is None:
            continue
        grad_sq += summary["grad_sq"] * count
        trace += summary["trace"] * count
        windows += count
        trials += 1
        if summary.get("b_simple") is not None:
            per_trial.append(summary["b_simple"])
    if not windows:
        return None
    return {
        "b_simple": noise_scale_from(grad_sq / windows, trace / windows),
        "trials": trials,
        "windows": windows,
        "per_trial_range": [min(per_trial), max(per_trial)] if per_trial else None,
    }


def statistical_efficiency(noise_scale: float | None, batch: float, base_batch: float) -> float:
    """Progress per sample at ``batch`` relative to ``base_batch``: (B_noise + B_0) / (B_noise + B).

    1 at the base batch, falling towards (B_noise + B_0)/B once the batch passes the noise
    scale: past it, doubling the batch no longer halves the steps. ``None`` (unbounded
    noise scale) gives 1: every sample counts fully.
    """
    if batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch={batch} and base_batch={base_batch} must be > 0")
    if noise_scale is None or math.isinf(noise_scale):
        return 1.0
    return (noise_scale + base_batch) / (noise_scale + batch)


def adascale_gain(noise_scale: float | None, batch: float, base_batch: float) -> float:
    """AdaScale's gain ratio (Johnson et al. 2020) for ``batch`` against ``base_batch``.

    r = (B/B_0) · (B_noise + B_0)/(B_noise + B): how many base-batch SGD steps one step at
    ``batch`` is worth, between 1 (noise-free: a larger batch buys nothing) and B/B_0
    (noise-dominated: the linear rule). It is batch ratio × :func:`statistical_efficiency`.
    """
    return batch / base_batch * statistical_efficiency(noise_scale, batch, base_batch)
