"""The probe phase: find the memory wall, the largest micro-batch that fits the budget.

Peak memory is close to affine in the micro-batch (weights, optimizer state and the
runtime are fixed; activations grow with every sample), so a few small probes fit
``peak = intercept + slope × micro_batch`` with scikit-learn, the fit predicts the
wall, and one or two real probes confirm it. Every probe runs in a trial worker, so
an OOM on the way never touches the caller's process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from autobatch.core.config import TrialResult
from autobatch.errors import AutobatchError

ProbeRunner = Callable[[int], TrialResult]

#: micro-batch sizes of the first two probes, before the fit says where to look
FIRST_PROBES = (4, 32)
MAX_CONFIRMATIONS = 8
#: stop once the wall is pinned down to this share of the micro-batch
CLOSE_ENOUGH = 0.02
#: how far past the model's wall to look when no larger probe has failed yet
STALL_STEP = 0.03


class ProbeError(AutobatchError):
    """The probe could not find any micro-batch that fits (or the task fails outright)."""


@dataclass
class MemoryModel:
    """``peak_bytes ≈ intercept_bytes + bytes_per_sample × micro_batch``, fitted on probes."""

    intercept_bytes: float
    bytes_per_sample: float
    points: list[tuple[int, int]] = field(default_factory=list)  # (micro_batch, peak bytes) of ok probes

    @classmethod
    def fit(cls, points: list[tuple[int, int]]) -> MemoryModel:
        import numpy as np
        from sklearn.linear_model import LinearRegression

        x = np.array([[m] for m, _ in points], dtype=float)
        y = np.array([p for _, p in points], dtype=float)
        if len(points) == 1:
            return cls(intercept_bytes=float(y[0]), bytes_per_sample=0.0, points=list(points))
        # Recent, larger probes matter most near the wall: weight by micro-batch size.
        regression = LinearRegression().fit(x, y, sample_weight=x[:, 0])
        slope = max(float(regression.coef_[0]), 0.0)
        return cls(intercept_bytes=float(regression.intercept_), bytes_per_sample=slope, points=list(points))

    def predict(self, micro_batch: int) -> float:
        return self.intercept_bytes + self.bytes_per_sample * micro_batch

    def largest_fitting(self, limit_bytes: float) -> int | None:
        """The largest micro-batch predicted to stay within ``limit_bytes`` (None: no limit found)."""
        if self.bytes_per_sample <= 0:
            return None
        return int(math.floor((limit_bytes - self.intercept_bytes) / self.bytes_per_sample))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MemoryModel:
        return cls(
            intercept_bytes=float(data["intercept_bytes"]),
            bytes_per_sample=float(data["bytes_per_sample"]),
            points=[(int(m), int(p)) for m, p in data.get("points", [])],
        )


@dataclass
class ProbeResult:
    """The wall, the fitted model, and every probe that was run to find them."""

    max_micro_batch: int
    memory_model: MemoryModel
    budget_bytes: int
    safety_margin: float
    probes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "max_micro_batch": self.max_micro_batch,
            "memory_model": self.memory_model.to_dict(),
            "budget_bytes": self.budget_bytes,
            "safety_margin": self.safety_margin,
            "probes": self.probes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ProbeResult:
        return cls(
            max_micro_batch=int(data["max_micro_batch"]),
            memory_model=MemoryModel.from_dict(data["memory_model"]),
            budget_bytes=int(data["budget_bytes"]),
            safety_margin=float(data["safety_margin"]),
            probes=list(data.get("probes", [])),
            seconds=float(data.get("seconds", 0.0)),
        )


def find_memory_wall(
    run_probe: ProbeRunner,
    budget_bytes: int,
    *,
    safety_margin: float = 0.05,
    upper_limit: int | None = None,
    on_probe: Callable[[int, TrialResult], None] | None = None,
) -> ProbeResult:
    """The largest micro-batch whose peak stays within ``(1 - safety_margin) × budget_bytes``.

    ``run_probe(m)`` runs a short trial at micro-batch ``m`` in a worker, capped at
    ``(1 - safety_margin) × budget_bytes``; a probe that completes fits. The fitted
    peak readings only guide where to probe next. ``upper_limit`` caps the answer.
    """
    started = time.perf_counter()
    limit = budget_bytes * (1.0 - safety_margin)
    fits: dict[int, int] = {}  # micro-batch -> peak bytes, for probes that ran and stayed within the limit
    too_big: int | None = None  # smallest micro-batch known not to fit
    probes: list[dict] = []

    def probe(micro_batch: int) -> bool:
        nonlocal too_big
        result = run_probe(micro_batch)
        if on_probe is not None:
            on_probe(micro_batch, result)
        probes.append(
            {"micro_batch": micro_batch, "status": result.status, "peak_memory_bytes": result.peak_memory_bytes}
        )
        if result.status == "error":
            raise ProbeError(f"the task fails at micro-batch {micro_batch}: {result.error}")
        if result.status == "ok" and result.peak_memory_bytes is not None:
            fits[micro_batch] = result.peak_memory_bytes
            return True
        too_big = micro_batch if too_big is None else min(too_big, micro_batch)
        return False

    for micro_batch in _first_probes(upper_limit):
        if not probe(micro_batch):
            break
    if not fits:
        if not probe(1):
            raise ProbeError(
                f"even micro-batch 1 does not fit the memory budget ({budget_bytes} bytes with a "
                f"{safety_margin:.0%} safety margin); raise memory_budget"
            )

    last_failed = False
    for _ in range(MAX_CONFIRMATIONS):
        best_fit = max(fits)
        if upper_limit is not None and best_fit >= upper_limit:
            break
        if too_big is not None and too_big - best_fit <= max(1, int(best_fit * CLOSE_ENOUGH)):
            break
        guess = MemoryModel.fit(sorted(fits.items())).largest_fitting(limit)
        if too_big is not None and (last_failed or guess is None or guess <= best_fit or guess >= too_big):
            guess = (best_fit + too_big) // 2  # the model is off near the wall: bisect
        elif guess is None:
            guess = best_fit * 2  # memory did not grow with the micro-batch: look further out
        elif guess <= best_fit:
            # The model puts the wall here, but nothing larger has failed yet: readings can
            # run a little high (copy-on-write pages in a forked trial), so step past it.
            guess = best_fit + max(1, math.ceil(best_fit * STALL_STEP))
        if upper_limit is not None:
            guess = min(guess, upper_limit)
        last_failed = not probe(guess)

    wall = max(fits)
    return ProbeResult(
        max_micro_batch=wall,
        memory_model=MemoryModel.fit(sorted(fits.items())),
        budget_bytes=budget_bytes,
        safety_margin=safety_margin,
        probes=probes,
        seconds=time.perf_counter() - started,
    )


def _first_probes(upper_limit: int | None) -> list[int]:
    sizes = [m for m in FIRST_PROBES if upper_limit is None or m <= upper_limit]
    return sizes or [1]
