"""Which samples each accumulation window trains on, and how fast the windows went.

Framework-free helpers that both backends share, so the same seed gives the same
sample order on PyTorch and TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """One optimizer step: the index arrays of its micro-batches, in order."""

    index: int
    micro_batches: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        return sum(len(mb) for mb in self.micro_batches)

    def weights(self) -> list[float]:
        """Each micro-batch's share of the window's samples: the factor its mean loss gets.

        With these weights the summed gradients equal the gradient of the window's mean
        loss, also when the last micro-batch is short.
        """
        total = self.size
        return [len(mb) / total for mb in self.micro_batches]


class SampleStream:
    """An endless, seeded stream of training indices: one fresh permutation per epoch."""

    def __init__(self, n_samples: int, seed: int = 0, shuffle: bool = True):
        self._n = n_samples
        self._rng = np.random.default_rng(seed)
        self._shuffle = shuffle
        self._buffer = np.empty(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        while len(self._buffer) < count:
            epoch = self._rng.permutation(self._n) if self._shuffle else np.arange(self._n)
            self._buffer = np.concatenate([self._buffer, epoch.astype(np.int64)])
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken


def plan_windows(
    stream: SampleStream, total_samples: int, micro_batch_size: int, accumulation_steps: int, start_index: int = 0
) -> Iterator[Window]:
    """Windows covering exactly ``total_samples`` samples of ``stream``.

    Every window holds ``micro_batch_size × accumulation_steps`` samples except
    possibly the last, whose last micro-batch may then be short.
    """
    effective = micro_batch_size * accumulation_steps
    remaining = total_samples
    index = start_index
    while remaining > 0:
        indices = stream.take(min(effective, remaining))
        remaining -= len(indices)
        micro = tuple(indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size))
        yield Window(index=index, micro_batches=micro)
        index += 1


class SteadyStateTimer:
    """Samples per second over the windows after the first ``warmup_windows``.

    Call :meth:`window_done` when a window's update has finished (after device
    synchronisation); the time between window ends includes data loading. Time
    between :meth:`pause` and :meth:`resume` (evaluation) is left out when timed
    windows follow it.
    """

    def __init__(self, warmup_windows: int):
        self.warmup_windows = warmup_windows
        self.timed_samples = 0
        self.timed_windows = 0
        self._windows_done = 0
        self._start: float | None = None
        self._last: float | None = None
        self._created = time.perf_counter()
        self._paused_at: float | None = None
        self._pending_pause = 0.0  # paused time not yet followed by a timed window
        self._excluded = 0.0  # paused time between the start and the last timed window

    def window_done(self, samples: int) -> None:
        now = time.perf_counter()
        self._windows_done += 1
        if self._windows_done <= self.warmup_windows:
            self._start, self._pending_pause = now, 0.0
            return
        if self._start is None:  # no warm-up asked for: time from the timer's creation
            self._start = self._created
        self._excluded += self._pending_pause
        self._pending_pause = 0.0
        self.timed_samples += samples
        self.timed_windows += 1
        self._last = now

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._pending_pause += time.perf_counter() - self._paused_at
            self._paused_at = None

    @property
    def samples_per_second(self) -> float | None:
        if self.timed_windows == 0 or self._last is None or self._start is None:
            return None
        elapsed = self._last - self._start - self._excluded
        return self.timed_samples / elapsed if elapsed > 0 else None


def extra_timing_windows(train_windows: int, warmup_windows: int, min_timed_windows: int) -> int:
    """Windows to run after evaluation, for timing alone, when training had too few to time.

    Warm-up windows not yet spent in training are spent there first.
    """
    return max(0, warmup_windows + min_timed_windows - train_windows)
