"""The search space: micro-batch × accumulation × learning rate around a scaling rule.

The learning rate is searched as an offset from a scaling rule rather than on its
own, because the good learning rate moves with the effective batch:

    lr = base_lr × (effective_batch / base_batch) ** alpha × 10 ** delta

with alpha = 1 (linear rule, Goyal et al., for SGD) or 0.5 (square-root rule, for
Adam-like optimizers), and delta searched in ``lr_offset_range`` decades. With
``lr_rule="absolute"`` the learning rate is searched on its own log range instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from autobatch.config import TrialConfig
from autobatch.errors import InvalidParameterError

LR_RULES = {"linear": 1.0, "sqrt": 0.5, "absolute": None}


@dataclass(frozen=True)
class SearchSpace:
    """Bounds and shape of the joint search. ``max_micro_batch=None`` means: the probe's wall."""

    min_micro_batch: int = 1
    max_micro_batch: int | None = None
    powers_of_two: bool = False
    max_accumulation: int = 8
    lr_rule: str | None = None  # None: "sqrt" for Adam, "linear" for SGD
    lr_offset_range: tuple[float, float] = (-1.0, 1.0)
    lr_range: tuple[float, float] = (1e-5, 1e-1)

    def __post_init__(self) -> None:
        _positive_int("min_micro_batch", self.min_micro_batch)
        if self.max_micro_batch is not None:
            _positive_int("max_micro_batch", self.max_micro_batch)
            if self.max_micro_batch < self.min_micro_batch:
                raise InvalidParameterError(
                    "max_micro_batch",
                    self.max_micro_batch,
                    f"must be >= min_micro_batch ({self.min_micro_batch}); the bounds are reversed",
                )
        _positive_int("max_accumulation", self.max_accumulation)
        if self.lr_rule is not None and self.lr_rule not in LR_RULES:
            raise InvalidParameterError("lr_rule", self.lr_rule, f"must be one of {sorted(LR_RULES)}")
        low, high = self.lr_offset_range
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise InvalidParameterError("lr_offset_range", self.lr_offset_range, "must be (low, high) with low <= high")
        low, high = self.lr_range
        if not (0 < low < high and math.isfinite(high)):
            raise InvalidParameterError("lr_range", self.lr_range, "must be (low, high) with 0 < low < high")

    def rule_for(self, optimizer: str) -> str:
        return self.lr_rule or ("linear" if optimizer == "sgd" else "sqrt")

    def micro_batch_bounds(self, wall: int) -> tuple[int, int]:
        """The searched micro-batch range once the probe's wall is known."""
        # A maximum set by hand may lie past the wall: those configs are then recorded as
        # skipped (predicted over budget) rather than run.
        high = wall if self.max_micro_batch is None else self.max_micro_batch
        return self.min_micro_batch, max(high, self.min_micro_batch)

    def suggest(self, trial, wall: int, base_batch: int, base_lr: float, optimizer: str) -> TrialConfig:
        """Ask an Optuna trial for a config; the names are what the dashboard shows."""
        low, high = self.micro_batch_bounds(wall)
        if self.powers_of_two:
            exponents = (math.ceil(math.log2(low)), math.floor(math.log2(high)))
            if exponents[0] > exponents[1]:
                raise InvalidParameterError("powers_of_two", True, f"no power of two lies in [{low}, {high}]")
            micro = 2 ** trial.suggest_int("micro_batch_log2", *exponents)
        else:
            micro = trial.suggest_int("micro_batch_size", low, high, log=True)
        accumulation = trial.suggest_int("accumulation_steps", 1, self.max_accumulation, log=True)
        rule = self.rule_for(optimizer)
        if rule == "absolute":
            learning_rate = trial.suggest_float("learning_rate", *self.lr_range, log=True)
        else:
            offset = trial.suggest_float("lr_offset_decades", *self.lr_offset_range)
            learning_rate = scaled_learning_rate(base_lr, base_batch, micro * accumulation, rule, offset)
        return TrialConfig(micro, accumulation, learning_rate)

    def params_for(self, config: TrialConfig, base_batch: int, base_lr: float, optimizer: str) -> dict:
        """The Optuna params that reproduce ``config`` (for enqueueing starting points)."""
        params: dict = {"accumulation_steps": config.accumulation_steps}
        if self.powers_of_two:
            params["micro_batch_log2"] = int(round(math.log2(config.micro_batch_size)))
        else:
            params["micro_batch_size"] = config.micro_batch_size
        rule = self.rule_for(optimizer)
        if rule == "absolute":
            params["learning_rate"] = config.learning_rate
        else:
            at_rule = scaled_learning_rate(base_lr, base_batch, config.effective_batch_size, rule, 0.0)
            params["lr_offset_decades"] = math.log10(config.learning_rate / at_rule)
        return params

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        data = dict(data)
        for key in ("lr_offset_range", "lr_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def scaled_learning_rate(base_lr: float, base_batch: int, effective_batch: int, rule: str, offset_decades: float) -> float:
    """``base_lr × (effective / base) ** alpha × 10 ** offset`` for the named rule."""
    alpha = LR_RULES[rule]
    if alpha is None:
        return base_lr * 10**offset_decades
    return base_lr * (effective_batch / base_batch) ** alpha * 10**offset_decades


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(name, value, "must be an integer >= 1")
