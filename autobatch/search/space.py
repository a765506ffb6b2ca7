"""The search space: micro-batch × accumulation × learning rate around a scaling rule.

The learning rate is searched as an offset from a scaling rule rather than on its
own, because the good learning rate moves with the effective batch:

    lr = base_lr × factor(effective_batch / base_batch) × 10 ** delta

with delta searched in ``lr_offset_range`` decades and the factor named by ``lr_rule``:

- ``linear``: B/B_0 (Goyal et al. 2017), the default for SGD;
- ``sqrt``: (B/B_0) ** 0.5, the default for Adam-like optimizers;
- ``adascale``: AdaScale's gain r = (B/B_0)(B_noise + B_0)/(B_noise + B) from the
  study's measured gradient noise scale (:mod:`autobatch.core.noise`): linear while the batch
  is below the noise scale, flat past it, where a larger batch buys no progress. For
  Adam-like optimizers, whose noise-dominated limit is the square-root rule, r ** 0.5;
- ``absolute``: no rule; the learning rate is searched on its own log range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from autobatch._validation import Interval, StrOptions, validate_fields
from autobatch.core.config import TrialConfig
from autobatch.core.noise import adascale_gain
from autobatch.errors import InvalidParameterError

LR_RULES = ("linear", "sqrt", "adascale", "absolute")


@dataclass(frozen=True)
class SearchSpace:
    """Bounds and shape of the joint search. ``max_micro_batch=None`` means: the probe's wall.

    ``max_effective_batch`` bounds micro-batch × accumulation; ``None`` means: the horizon's
    samples in 16 optimizer steps (:func:`autobatch.search.fidelity.largest_effective_batch`),
    no bound for a horizon in steps or wall time. The memory wall is not looked for past it.
    """

    min_micro_batch: int = 1
    max_micro_batch: int | None = None
    powers_of_two: bool = False
    max_accumulation: int = 8
    max_effective_batch: int | None = None
    lr_rule: str | None = None  # None: "sqrt" for Adam, "linear" for SGD; "adascale" for the goodput objective
    lr_offset_range: tuple[float, float] = (-1.0, 1.0)
    lr_range: tuple[float, float] = (1e-5, 1e-1)

    _parameter_constraints: ClassVar[dict] = {
        "min_micro_batch": Interval(int, 1, None),
        "max_micro_batch": [Interval(int, 1, None), None],
        "max_accumulation": Interval(int, 1, None),
        "max_effective_batch": [Interval(int, 1, None), None],
        "lr_rule": [StrOptions(LR_RULES), None],
    }

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.max_effective_batch is not None and self.max_effective_batch < self.min_micro_batch:
            raise InvalidParameterError(
                "max_effective_batch",
                self.max_effective_batch,
                f"must be >= min_micro_batch ({self.min_micro_batch}): no micro-batch would be left to search",
            )
        if self.max_micro_batch is not None and self.max_micro_batch < self.min_micro_batch:
            raise InvalidParameterError(
                "max_micro_batch",
                self.max_micro_batch,
                f"must be >= min_micro_batch ({self.min_micro_batch}); the bounds are reversed",
            )
        low, high = self.lr_offset_range
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise InvalidParameterError("lr_offset_range", self.lr_offset_range, "must be (low, high) with low <= high")
        low, high = self.lr_range
        if not (0 < low < high and math.isfinite(high)):
            raise InvalidParameterError("lr_range", self.lr_range, "must be (low, high) with 0 < low < high")

    def rule_for(self, optimizer: str, objective: str = "pareto") -> str:
        if self.lr_rule:
            return self.lr_rule
        if objective == "goodput":
            return "adascale"  # goodput's efficiency and AdaScale's gain are one model (Pollux)
        return "linear" if optimizer == "sgd" else "sqrt"

    def micro_batch_bounds(self, wall: int) -> tuple[int, int]:
        """The searched micro-batch range once the probe's wall is known."""
        # A maximum set by hand may lie past the wall: those configs are then recorded as
        # skipped (predicted over budget) rather than run.
        high = wall if self.max_micro_batch is None else self.max_micro_batch
        return self.min_micro_batch, max(high, self.min_micro_batch)

    def suggest(
        self,
        trial,
        wall: int,
        base_batch: int,
        base_lr: float,
        optimizer: str,
        *,
        rule: str | None = None,
        noise_scale: float | None = None,
        pin_learning_rate: bool = False,
        max_effective_batch: int | None = None,
    ) -> TrialConfig:
        """Ask an Optuna trial for a config; the names are what the dashboard shows.

        ``rule`` defaults to :meth:`rule_for`; ``noise_scale`` is the study's B_noise for
        the ``adascale`` rule (``math.inf`` when unbounded). ``pin_learning_rate`` takes
        the rule's learning rate without an offset (the goodput objective, which cannot
        rank learning rates, does so). ``max_effective_batch`` bounds micro-batch ×
        accumulation (the horizon's, :func:`autobatch.search.fidelity.largest_effective_batch`):
        the accumulation's range is asked for after the micro-batch, up to what it leaves.
        """
        low, high = self.micro_batch_bounds(wall)
        if max_effective_batch is not None:
            high = max(low, min(high, max_effective_batch))
        if self.powers_of_two:
            exponents = (math.ceil(math.log2(low)), math.floor(math.log2(high)))
            if exponents[0] > exponents[1]:
                raise InvalidParameterError("powers_of_two", True, f"no power of two lies in [{low}, {high}]")
            micro = 2 ** trial.suggest_int("micro_batch_log2", *exponents)
        else:
            micro = trial.suggest_int("micro_batch_size", low, high, log=True)
        most = self.max_accumulation
        if max_effective_batch is not None:
            most = max(1, min(most, max_effective_batch // micro))
        accumulation = trial.suggest_int("accumulation_steps", 1, most, log=True)
        rule = rule or self.rule_for(optimizer)
        if rule == "absolute":
            learning_rate = trial.suggest_float("learning_rate", *self.lr_range, log=True)
        else:
            offset = 0.0 if pin_learning_rate else trial.suggest_float("lr_offset_decades", *self.lr_offset_range)
            learning_rate = scaled_learning_rate(
                base_lr, base_batch, micro * accumulation, rule, offset, noise_scale=noise_scale, optimizer=optimizer
            )
        return TrialConfig(micro, accumulation, learning_rate)

    def params_for(
        self,
        config: TrialConfig,
        base_batch: int,
        base_lr: float,
        optimizer: str,
        *,
        rule: str | None = None,
        noise_scale: float | None = None,
        pin_learning_rate: bool = False,
    ) -> dict:
        """The Optuna params that reproduce ``config`` (for enqueueing starting points)."""
        params: dict = {"accumulation_steps": config.accumulation_steps}
        if self.powers_of_two:
            params["micro_batch_log2"] = int(round(math.log2(config.micro_batch_size)))
        else:
            params["micro_batch_size"] = config.micro_batch_size
        rule = rule or self.rule_for(optimizer)
        if rule == "absolute":
            params["learning_rate"] = config.learning_rate
        elif not pin_learning_rate:
            at_rule = scaled_learning_rate(
                base_lr,
                base_batch,
                config.effective_batch_size,
                rule,
                0.0,
                noise_scale=noise_scale,
                optimizer=optimizer,
            )
            params["lr_offset_decades"] = math.log10(config.learning_rate / at_rule)
        return params

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        data = dict(data)
        for key in ("lr_offset_range", "lr_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def scaled_learning_rate(
    base_lr: float,
    base_batch: int,
    effective_batch: int,
    rule: str,
    offset_decades: float,
    *,
    noise_scale: float | None = None,
    optimizer: str = "sgd",
) -> float:
    """``base_lr × factor × 10 ** offset`` for the named rule (see the module docstring).

    ``noise_scale`` (B_noise; ``math.inf`` when unbounded) is needed by ``adascale`` alone.
    """
    return (
        base_lr * learning_rate_factor(rule, effective_batch, base_batch, noise_scale, optimizer) * 10**offset_decades
    )


def learning_rate_factor(
    rule: str, effective_batch: int, base_batch: int, noise_scale: float | None, optimizer: str
) -> float:
    """How much the rule scales the base learning rate at ``effective_batch``."""
    ratio = effective_batch / base_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "adascale":
        if noise_scale is None:
            raise InvalidParameterError("noise_scale", noise_scale, "the adascale rule needs the gradient noise scale")
        gain = adascale_gain(noise_scale, effective_batch, base_batch)
        # The gain is derived for SGD; Adam's noise-dominated limit is the square-root rule.
        return gain if optimizer == "sgd" else math.sqrt(gain)
    if rule == "absolute":
        return 1.0
    raise InvalidParameterError("lr_rule", rule, f"must be one of {list(LR_RULES)}")
