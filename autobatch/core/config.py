"""Plain dataclasses that describe a trial and its outcome.

They are framework-free and cross the process boundary between the study and its
trial workers as JSON, so every field is a plain Python value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from autobatch.errors import InvalidParameterError

TRIAL_STATUSES = ("ok", "oom", "error", "timeout")
OOM_PHASES = ("setup", "train", "eval")


@dataclass(frozen=True)
class TrialConfig:
    """What one trial trains with. The effective batch is micro-batch × accumulation."""

    micro_batch_size: int
    accumulation_steps: int = 1
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        _require_positive_int("micro_batch_size", self.micro_batch_size)
        _require_positive_int("accumulation_steps", self.accumulation_steps)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise InvalidParameterError("learning_rate", lr, "must be a finite number > 0")

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "effective_batch_size": self.effective_batch_size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        return cls(
            micro_batch_size=int(data["micro_batch_size"]),
            accumulation_steps=int(data.get("accumulation_steps", 1)),
            learning_rate=float(data.get("learning_rate", 1e-3)),
        )


@dataclass(frozen=True)
class TrialBudget:
    """How much work one trial does.

    ``train_samples`` is the number of samples trained on before the validation loss
    is measured, so trials of different configs are compared after the same amount
    of data. Throughput is measured over the windows after ``warmup_steps``; if the
    sample budget leaves fewer than ``min_timed_steps`` timed windows, extra windows
    are run after evaluation for timing alone.

    ``train_seconds`` trains for that much wall-clock training time instead of
    ``train_samples`` samples (evaluation is not counted), measuring the validation
    loss ``evaluations`` times at evenly spaced points; the losses before the last are
    the intermediate values a pruner may stop the trial on (``objective="time-to-target"``).
    ``measure_noise`` estimates the gradient noise scale in trials that accumulate
    (:mod:`autobatch.core.noise`); turning it off exists to measure what it costs.

    ``evaluation_fractions`` places the evaluations instead: at those shares of the budget
    (samples or seconds), ascending, the last at 1.0; every one but the last is reported to
    the study's pruner, as the thousandths of the budget trained (a multi-fidelity search
    continues only the trials that lead at each share: :mod:`autobatch.search.fidelity`).
    Empty: a sample budget evaluates once, a time budget ``evaluations`` times, evenly.
    """

    train_samples: int = 2048
    warmup_steps: int = 2
    min_timed_steps: int = 2
    eval_batch_size: int | None = None  # None: the trial's micro-batch size
    val_samples: int | None = None  # None: the whole validation split
    mixed_precision: bool = False
    num_workers: int = 0  # data-loading worker processes (PyTorch DataLoader)
    seed: int = 0
    train_seconds: float | None = None  # None: train ``train_samples`` samples
    evaluations: int = 4  # validation-loss measurements within ``train_seconds``
    measure_noise: bool = True
    evaluation_fractions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _require_positive_int("train_samples", self.train_samples)
        seconds = self.train_seconds
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise InvalidParameterError("train_seconds", seconds, "must be a number of seconds > 0, or None")
        _require_positive_int("evaluations", self.evaluations)
        _require_non_negative_int("warmup_steps", self.warmup_steps)
        _require_positive_int("min_timed_steps", self.min_timed_steps)
        if self.eval_batch_size is not None:
            _require_positive_int("eval_batch_size", self.eval_batch_size)
        if self.val_samples is not None:
            _require_positive_int("val_samples", self.val_samples)
        _require_non_negative_int("num_workers", self.num_workers)
        fractions = tuple(float(f) for f in self.evaluation_fractions)  # a list, once it has been JSON
        object.__setattr__(self, "evaluation_fractions", fractions)
        if fractions and (
            fractions[-1] != 1.0
            or any(not 0 < f <= 1 for f in fractions)
            or any(a >= b for a, b in zip(fractions, fractions[1:], strict=False))
        ):
            raise InvalidParameterError(
                "evaluation_fractions", list(fractions), "must be ascending shares in (0, 1] that end at 1.0"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialBudget:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrialResult:
    """The outcome of one trial, whatever happened to it.

    ``status`` is ``ok``, ``oom`` (the memory budget was hit; ``oom_phase`` says
    where), ``error`` (anything else went wrong; ``error`` holds the reason) or
    ``timeout``. Memory figures are bytes. ``peak_memory_bytes`` is what compares
    with the budget (``memory_budget_covers`` says what that is on the trial's device):
    on the CPU the worker's peak resident memory plus the data segment's untouched
    reservations, since the CPU cap (``RLIMIT_DATA``) counts those too; on a GPU the
    allocator's peak (``allocator_peak_bytes``: bytes reserved in PyTorch, bytes in use
    in TensorFlow) plus what the process holds outside the allocator
    (``device_overhead_bytes``: the CUDA context, kernels and library workspaces,
    measured with NVML; ``None`` where it could not be). ``peak_resident_bytes`` is the
    plain resident peak; ``baseline_memory_bytes`` is the data segment (or allocator)
    size once the model is built, before training.
    """

    status: str
    config: TrialConfig
    samples_per_second: float | None = None
    val_loss: float | None = None
    peak_memory_bytes: int | None = None
    peak_resident_bytes: int | None = None
    baseline_memory_bytes: int | None = None
    memory_budget_bytes: int | None = None
    #: what the budget covers on this trial's device (:func:`autobatch.core.memory.budget_coverage`)
    memory_budget_covers: str | None = None
    #: on a GPU: the framework allocator's own peak, before the memory outside it is added
    allocator_peak_bytes: int | None = None
    #: on a GPU: what the trial process held outside the allocator at the end (CUDA context, kernels, workspaces)
    device_overhead_bytes: int | None = None
    oom_phase: str | None = None
    error: str | None = None
    samples_trained: int = 0
    steps_timed: int = 0
    framework: str | None = None
    device: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    #: what the device and the worker did during the trial (autobatch.process.telemetry); {} when not sampled
    telemetry: dict[str, Any] = field(default_factory=dict)
    #: the gradient noise scale B_simple estimated over the trial's windows (accumulation >= 2 only)
    noise_scale: float | None = None
    #: the estimate's parts (:meth:`autobatch.core.noise.NoiseScaleEstimator.summary`); {} when not measured
    gradient_noise: dict[str, Any] = field(default_factory=dict)
    #: the validation losses measured during a time-budgeted trial: [{"step", "train_seconds", "val_loss"}, ...]
    intermediate_losses: list[dict[str, float]] = field(default_factory=list)
    #: a pruner stopped the trial early; ``val_loss`` is then the last intermediate loss
    pruned: bool = False

    def __post_init__(self) -> None:
        if self.status not in TRIAL_STATUSES:
            raise InvalidParameterError("status", self.status, f"must be one of {TRIAL_STATUSES}")
        if self.oom_phase is not None and self.oom_phase not in OOM_PHASES:
            raise InvalidParameterError("oom_phase", self.oom_phase, f"must be one of {OOM_PHASES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        data = dict(data)
        data["config"] = TrialConfig.from_dict(data["config"])
        data["telemetry"] = data.get("telemetry") or {}  # JSON from before telemetry has none
        data["gradient_noise"] = data.get("gradient_noise") or {}
        data["intermediate_losses"] = data.get("intermediate_losses") or []
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(name, value, "must be an integer >= 1")


def _require_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameterError(name, value, "must be an integer >= 0")
