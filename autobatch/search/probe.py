"""The probe phase: find the memory wall, the largest micro-batch that fits the budget.

Peak memory is close to affine in the micro-batch (weights, optimizer state and the
runtime are fixed; activations grow with every sample), so a few small probes fit
``peak = intercept + slope × micro_batch`` with scikit-learn, the fit predicts the
wall, and one or two real probes confirm it. Every probe runs in a trial worker, so
an OOM on the way never touches the caller's process.

A probe needs the peak, not the throughput or the loss, so it stops when it knows
(:func:`probe_budget`): two windows (the first builds the optimizer's state, the second
runs with it), an evaluation of a few batches at the evaluation batch size, one more
window (training resumes after evaluation: the allocator's fragmentation, which a probe
without it once missed), and the windows that time it. The probes run at one accumulation
step; the search runs up to its largest. From a window's second micro-batch on, the gradients
are held while the next forward pass builds its activations (PyTorch's ``.grad``, TensorFlow's
accumulators): a fixed extra, about the parameters' size, that one step does not pay at its
peak. Short probes at two steps measure it and move the wall down by it. Nothing else a backend
holds should grow with the steps (each micro-batch is fetched when it is used), but a model's
or an allocator's may: so the wall is last confirmed with a full trial at the largest
accumulation searched, and lowered until it holds there too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from autobatch.core.config import TrialBudget, TrialConfig, TrialResult
from autobatch.errors import AutobatchError

ProbeRunner = Callable[[int], TrialResult]

#: micro-batch sizes of the first two probes, before the fit says where to look
FIRST_PROBES = (4, 32)
MAX_CONFIRMATIONS = 8
#: probes past the first two: each is a short run now (probe_budget), so a bracket can be pinned down
MAX_SEARCH_PROBES = 10
#: stop once the wall is pinned down to this share of the micro-batch
CLOSE_ENOUGH = 0.02
#: how far past the model's wall to look when no larger probe has failed yet
STALL_STEP = 0.03
#: windows a probe trains, with an evaluation after the first (see probe_budget)
PROBE_WINDOWS = 2
#: batches a probe evaluates, at the evaluation batch size: the first holds the eval peak,
#: the second runs with what the first left behind
PROBE_EVAL_BATCHES = 2
#: how far below a micro-batch that did not fit the next probe looks, after a miss that followed a fit
STEP_DOWN = 0.06
#: until a probe has failed, the next looks at most this many times further out than the largest fit
MAX_GROWTH = 8
#: the accumulation of the short probes that place the confirmation: two steps hold the gradients
#: across a forward pass as any larger number does
ACCUMULATED_PROBE_STEPS = 2
#: short probes at two steps, past the one that measures what accumulating adds: the first
#: GALLOP_PROBES step out from the estimate (usually right), the rest bisect what is left
MAX_ACCUMULATED_PROBES = 8
GALLOP_PROBES = 2
#: what accumulating adds is read as nothing below this: two forked trials' peaks differ by about
#: 1 MiB, and divided by a flat model's bytes per sample that would be a wall of no size at all
READING_FLOOR_BYTES = 2 * 2**20


def probe_budget(trial_budget: TrialBudget, config: TrialConfig, *, full: bool = False) -> TrialBudget:
    """The budget of one memory probe of ``config``: what reaches the peak, and no more.

    Two windows with an evaluation between them: the first window ends with the optimizer's
    step, which builds its state; the evaluation runs with that state in memory, and the
    second window resumes training after it, with the state and whatever fragmentation the
    evaluation left (a probe without that resumption once passed where the full trial did
    not). The evaluation covers :data:`PROBE_EVAL_BATCHES` batches at the trial's evaluation
    batch size; the second window is the one timed (its samples/s plan how far the search's
    trials can train), so no window is added for timing.

    ``full``: the confirmation of the wall, as a search trial runs: the whole validation
    split (where sample sizes vary, its longest batch), and at least the trial's own samples.
    A time budget is run as samples: the peak depends on the config, not on how long it trains.
    """
    windows = PROBE_WINDOWS * config.effective_batch_size
    train_samples = max(windows, trial_budget.train_samples) if full else windows
    val_samples = trial_budget.val_samples
    if not full:
        bounded = (trial_budget.eval_batch_size or config.micro_batch_size) * PROBE_EVAL_BATCHES
        val_samples = bounded if val_samples is None else min(val_samples, bounded)
    return dataclasses.replace(
        trial_budget,
        train_samples=train_samples,
        train_seconds=None,
        evaluation_fractions=(config.effective_batch_size / train_samples, 1.0),
        val_samples=val_samples,
        warmup_steps=1,
        min_timed_steps=1,
    )


#: a probe's default time limit: this many times what the probes before it say it takes, and ...
PROBE_TIMEOUT_FACTOR = 20
#: ... never less than this many seconds (nor any limit before a probe has completed)
PROBE_TIMEOUT_FLOOR = 120.0


def probe_timeout(done: list[TrialResult], budget: TrialBudget, n_val: int) -> float | None:
    """How long a probe with ``budget`` may run when the user set no trial timeout.

    A probe that fills the cap usually dies of it, but not always: a TensorFlow probe once
    sat at the cap in futex waits for over ten minutes, and with no limit it would have held
    ``tune()`` forever. A probe that runs far longer than the completed ones (``done``) say
    it should is taken as out of memory. The estimate is the slowest completed probe's
    seconds per sample trained, over what this one trains and evaluates (evaluating costs
    less than training, so it is generous), times :data:`PROBE_TIMEOUT_FACTOR`.
    """
    rates = [
        result.timings["wall"] / result.samples_trained
        for result in done
        if result.status == "ok" and result.samples_trained and result.timings.get("wall")
    ]
    if not rates:
        return None
    val_samples = n_val if budget.val_samples is None else min(n_val, budget.val_samples)
    expected = max(rates) * ((budget.train_samples or 0) + val_samples)
    return max(PROBE_TIMEOUT_FLOOR, PROBE_TIMEOUT_FACTOR * expected)


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
    #: the accumulation the wall was confirmed at: the largest the search tries (1: not confirmed beyond one step)
    accumulation_steps: int = 1
    #: where memory depends on the sample: the size of the longest one, which every probe's worst window held
    worst_case_sample_size: int | None = None

    def to_dict(self) -> dict:
        return {
            "max_micro_batch": self.max_micro_batch,
            "memory_model": self.memory_model.to_dict(),
            "budget_bytes": self.budget_bytes,
            "safety_margin": self.safety_margin,
            "probes": self.probes,
            "seconds": self.seconds,
            "accumulation_steps": self.accumulation_steps,
            "worst_case_sample_size": self.worst_case_sample_size,
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
            accumulation_steps=int(data.get("accumulation_steps", 1)),
            worst_case_sample_size=data.get("worst_case_sample_size"),
        )


def find_memory_wall(
    run_probe: ProbeRunner,
    budget_bytes: int,
    *,
    safety_margin: float = 0.05,
    upper_limit: int | None = None,
    on_probe: Callable[[int, TrialResult], None] | None = None,
    confirm: ProbeRunner | None = None,
    accumulated: ProbeRunner | None = None,
    confirm_steps: Callable[[int], int] | None = None,
) -> ProbeResult:
    """The largest micro-batch whose peak stays within ``(1 - safety_margin) × budget_bytes``.

    ``run_probe(m)`` runs a short trial at micro-batch ``m`` in a worker, capped at
    ``(1 - safety_margin) × budget_bytes``; a probe that completes fits. The fitted
    peak readings only guide where to probe next. ``upper_limit`` caps the answer.
    ``confirm(m)`` runs a full trial at the largest accumulation the search will try:
    the wall is confirmed with it, and lowered until a confirmation completes.
    ``accumulated(m)`` runs a short probe at :data:`ACCUMULATED_PROBE_STEPS` steps: with it,
    the confirmation starts where the gradients held across a window still fit
    (:func:`_wall_when_accumulating`), so a full trial at the largest accumulation usually
    runs once, not once per step down. ``confirm_steps(m)`` is the accumulation ``confirm``
    runs micro-batch ``m`` at, where it depends on ``m``: the short probes run only when the
    confirmation at the wall goes past two steps (at two, it costs about what they would).
    """
    started = time.perf_counter()
    limit = budget_bytes * (1.0 - safety_margin)
    fits: dict[int, int] = {}  # micro-batch -> peak bytes, for probes that ran and stayed within the limit
    too_big: int | None = None  # smallest micro-batch known not to fit
    probes: list[dict] = []

    def run(runner: ProbeRunner, micro_batch: int, phase: str = "one step") -> TrialResult:
        result = runner(micro_batch)
        if on_probe is not None:
            on_probe(micro_batch, result)
        probes.append(
            {
                "micro_batch": micro_batch,
                "accumulation_steps": result.config.accumulation_steps,
                "phase": phase,  # "one step", "accumulated" (short, two steps) or "confirmation" (full)
                "status": result.status,
                "peak_memory_bytes": result.peak_memory_bytes,
                # what a trial costs, which plans how far the search's trials can train (search/fidelity.py)
                "samples_per_second": result.samples_per_second,
                "samples_trained": result.samples_trained,
                "seconds": result.timings.get("wall"),
            }
        )
        if result.status == "error":
            # One line: the error's own (a task's bad input names its parameter); the trial's
            # traceback is one `autobatch trial ... --json` away, and would bury it here.
            reason = (result.error or "").strip().splitlines()[0] if (result.error or "").strip() else "no message"
            reason = reason.removeprefix("InvalidParameterError: ")
            raise ProbeError(f"the task fails at {_config_text(result.config)}: {reason}")
        return result

    def probe(micro_batch: int) -> bool:
        nonlocal too_big
        result = run(run_probe, micro_batch)
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

    misses_in_a_row = 0
    for _ in range(MAX_SEARCH_PROBES):
        best_fit = max(fits)
        if upper_limit is not None and best_fit >= upper_limit:
            break
        if too_big is not None and too_big - best_fit <= max(1, int(best_fit * CLOSE_ENOUGH)):
            break
        guess = MemoryModel.fit(sorted(fits.items())).largest_fitting(limit)
        if too_big is not None:
            step_down = math.floor(too_big * (1 - STEP_DOWN))
            if misses_in_a_row >= 2 or guess is None or guess <= best_fit:
                guess = (best_fit + too_big) // 2  # the model is off near the wall: bisect
            elif guess >= too_big:
                # The model puts the wall past a miss: its readings run low near the wall (a
                # transient the peak meter did not catch). The wall is most likely just below
                # the miss: look there, and bisect where that has already been passed.
                guess = step_down if step_down > best_fit else (best_fit + too_big) // 2
        elif guess is None:
            guess = best_fit * 2  # memory did not grow with the micro-batch: look further out
        elif guess <= best_fit:
            # The model puts the wall here, but nothing larger has failed yet: readings can
            # run a little high (copy-on-write pages in a forked trial), so step past it.
            guess = best_fit + max(1, math.ceil(best_fit * STALL_STEP))
        if too_big is None:
            # Small probes read mostly what is fixed (a runtime's pools, reused as the
            # micro-batch grows), so the slope they give can be several times too low:
            # TensorFlow's probes at 4 and 32 put the wall 2-5x past it, and a miss far past
            # the wall is the dearest probe there is (it fills the cap, then dies). Growing
            # by at most MAX_GROWTH lets a probe nearer the wall correct the slope first.
            guess = min(guess, best_fit * MAX_GROWTH)
        if upper_limit is not None:
            guess = min(guess, upper_limit)
        misses_in_a_row = 0 if probe(guess) else misses_in_a_row + 1

    wall = max(fits)
    accumulation = 1
    if confirm is not None:
        if accumulated is not None and (confirm_steps is None or confirm_steps(wall) > ACCUMULATED_PROBE_STEPS):
            wall = _wall_when_accumulating(wall, fits, lambda micro_batch: run(accumulated, micro_batch, "accumulated"))
        confirming = lambda micro_batch: run(confirm, micro_batch, "confirmation")  # noqa: E731
        wall, accumulation = _confirm_wall(wall, confirming, budget_bytes)
    return ProbeResult(
        max_micro_batch=wall,
        memory_model=MemoryModel.fit(sorted(fits.items())),
        budget_bytes=budget_bytes,
        safety_margin=safety_margin,
        probes=probes,
        seconds=time.perf_counter() - started,
        accumulation_steps=accumulation,
    )


def _wall_when_accumulating(wall: int, fits: dict[int, int], run_accumulated: Callable[[int], TrialResult]) -> int:
    """Where the confirmation starts: the largest micro-batch up to ``wall`` whose short probe fits at two steps.

    One short probe at a small micro-batch that fitted at one step measures what holding the
    gradients adds to its peak; ``wall`` less that many bytes, at the fitted bytes per
    sample, is the first guess (``wall`` itself where it adds less than
    :data:`READING_FLOOR_BYTES`). From there :data:`GALLOP_PROBES` probes step out (2 %, 4 %
    of the wall) and the rest bisect, until the bracket is closed, never past ``wall``.
    Readings only place the first guess; what fits is what ran.
    """
    small = max((m for m in fits if m <= wall // 2), default=min(fits))
    reading = run_accumulated(small)
    if reading.status != "ok" or reading.peak_memory_bytes is None:
        return wall  # accumulating costs more than a small micro-batch holds: the confirmation steps down
    extra = reading.peak_memory_bytes - fits[small]
    slope = MemoryModel.fit(sorted(fits.items())).bytes_per_sample
    guess = wall if slope <= 0 or extra <= READING_FLOOR_BYTES else wall - math.ceil(extra / slope)
    low, high = small, wall + 1  # fits at two steps; not known to (nothing past the one-step wall is tried)
    micro_batch, step = max(small + 1, min(wall, guess)), max(1, int(wall * CLOSE_ENOUGH))
    for attempt in range(MAX_ACCUMULATED_PROBES):
        if not low < micro_batch < high:
            break
        fitted = run_accumulated(micro_batch).status == "ok"
        if fitted:
            low = micro_batch
        else:
            high = micro_batch
        if high - low <= max(1, int(low * CLOSE_ENOUGH)):
            break
        middle = (low + high) // 2
        if attempt < GALLOP_PROBES:
            micro_batch = min(low + step, middle) if fitted else max(high - step, middle)
            step *= 2
        else:
            micro_batch = middle
    return low


def _confirm_wall(wall: int, run_confirm: Callable[[int], TrialResult], budget_bytes: int) -> tuple[int, int]:
    """The largest micro-batch up to ``wall`` whose confirmation (at the search's largest accumulation) completes.

    Returns it with that accumulation. Each failure steps down twice as far as the last,
    from 3 % of the wall; once one completes, bisection pins the wall as the probe does.
    """
    confirmed: int | None = None  # the largest micro-batch whose confirmation completed
    failed: int | None = None  # the smallest whose confirmation did not
    accumulation = 1
    micro_batch, step = wall, max(1, math.ceil(wall * STALL_STEP))
    for _ in range(MAX_CONFIRMATIONS):
        result = run_confirm(micro_batch)
        accumulation = result.config.accumulation_steps
        if result.status == "ok":
            confirmed = micro_batch
        else:
            failed = micro_batch
        if confirmed is not None and (failed is None or failed - confirmed <= max(1, int(confirmed * CLOSE_ENOUGH))):
            break
        if confirmed is None:
            if micro_batch == 1:
                break
            micro_batch, step = max(1, micro_batch - step), step * 2
        else:
            assert failed is not None
            micro_batch = (confirmed + failed) // 2
    if confirmed is None:
        raise ProbeError(
            f"micro-batch {wall} fits the memory budget ({budget_bytes} bytes with its safety margin) at accumulation 1, "
            f"but no micro-batch down to {micro_batch} fits at accumulation {accumulation}, the largest the search "
            "tries; lower the search space's max_accumulation or raise memory_budget"
        )
    return confirmed, accumulation


def _config_text(config: TrialConfig) -> str:
    text = f"micro-batch {config.micro_batch_size}"
    return text if config.accumulation_steps == 1 else f"{text} x accumulation {config.accumulation_steps}"


def _first_probes(upper_limit: int | None) -> list[int]:
    sizes = [m for m in FIRST_PROBES if upper_limit is None or m <= upper_limit]
    return sizes or [1]
