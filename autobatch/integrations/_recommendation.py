"""The three numbers a study recommends, in one shape every integration reads.

A user hands an integration a :class:`~autobatch.TuneResult`, a stored study (storage URL and
study name), or the numbers themselves; :func:`load_recommendation` converts any of them once,
at the boundary, and the integrations only ever see a :class:`Recommendation`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from autobatch.errors import InvalidParameterError, StorageError


@dataclass(frozen=True)
class Recommendation:
    """A recommended config: micro-batch × accumulation steps at a learning rate.

    ``eval_batch_size`` is the largest micro-batch the study's probe trained *and evaluated*
    within the memory budget (a probe trial evaluates at its own micro-batch), so evaluation at
    it has run without OOM; None where the study has no probe wall.
    """

    micro_batch_size: int
    accumulation_steps: int
    learning_rate: float
    eval_batch_size: int | None = None
    study_name: str | None = None
    horizon: str | None = None  # the run the recommendation is for, as the study states it

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(name, value, "an int >= 1")
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise InvalidParameterError("learning_rate", rate, "a finite float > 0")
        if self.eval_batch_size is not None and (
            isinstance(self.eval_batch_size, bool)
            or not isinstance(self.eval_batch_size, int)
            or self.eval_batch_size < 1
        ):
            raise InvalidParameterError("eval_batch_size", self.eval_batch_size, "an int >= 1 or None")

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps

    def to_dict(self) -> dict:
        return {**asdict(self), "effective_batch_size": self.effective_batch_size}

    def as_huggingface(self) -> dict:
        """``transformers.TrainingArguments`` fields (per device: the budget the study measured is one device's)."""
        fields = {
            "per_device_train_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.accumulation_steps,
            "learning_rate": self.learning_rate,
        }
        if self.eval_batch_size is not None:
            fields["per_device_eval_batch_size"] = self.eval_batch_size
        return fields

    def as_keras(self) -> dict:
        """``model.fit``'s ``batch_size`` and the optimizer's accumulation steps and learning rate."""
        return {
            "batch_size": self.micro_batch_size,
            "optimizer": {"gradient_accumulation_steps": self.accumulation_steps, "learning_rate": self.learning_rate},
        }

    def as_lightning(self, batch_arg_name: str = "batch_size", lr_attr_name: str = "lr") -> dict:
        """A LightningCLI-style config: the DataModule's batch size, the Trainer's accumulation, the module's rate."""
        return {
            "trainer": {"accumulate_grad_batches": self.accumulation_steps},
            # flat, as LightningCLI(Model, Data) reads it (and as it merges over a base config)
            "model": {lr_attr_name: self.learning_rate},
            "data": {batch_arg_name: self.micro_batch_size},
        }

    def describe(self) -> str:
        where = f" (study {self.study_name!r})" if self.study_name else ""
        return (
            f"micro-batch {self.micro_batch_size} × {self.accumulation_steps} accumulation steps "
            f"(effective batch {self.effective_batch_size}), learning rate {self.learning_rate:.3g}{where}"
        )


def load_recommendation(
    source: Any = None, *, storage: str | None = None, study_name: str | None = None
) -> Recommendation:
    """A :class:`Recommendation` from a TuneResult, a Recommendation, a dict, or a stored study.

    ``load_recommendation(result)``, ``load_recommendation(study_name="s", storage="sqlite:///a.db")``
    or ``load_recommendation({"micro_batch_size": 16, "accumulation_steps": 4, "learning_rate": 1e-3})``.
    """
    from autobatch.search.results import TuneResult, load_study_result
    from autobatch.search.storage import DEFAULT_STORAGE

    if source is not None and study_name is not None:
        raise InvalidParameterError("study_name", study_name, "None when a result or config is given")
    if isinstance(source, Recommendation):
        return source
    if source is None:
        if not study_name:
            raise InvalidParameterError("study_name", study_name, "a stored study's name, or pass a TuneResult")
        source = load_study_result(storage or DEFAULT_STORAGE, study_name)
    if isinstance(source, TuneResult):
        return _from_tune_result(source)
    if isinstance(source, dict):
        return _from_dict(source)
    raise InvalidParameterError(
        "source",
        type(source).__name__,
        "a TuneResult, a Recommendation, a dict of the three numbers, or None with study_name",
    )


def _from_tune_result(result) -> Recommendation:
    if not result.recommended:
        raise StorageError(
            f"study_name={result.study_name!r}: the study has no recommendation yet "
            f"({result.n_trials} trials, none feasible and finished); run more trials"
        )
    horizon = (result.horizon or {}).get("horizon")
    return _from_dict(
        result.recommended,
        eval_batch_size=result.max_micro_batch or None,
        study_name=result.study_name,
        horizon=None if horizon is None else str(horizon),
    )


def _from_dict(values: dict, **extra: Any) -> Recommendation:
    missing = [key for key in ("micro_batch_size", "accumulation_steps", "learning_rate") if key not in values]
    if missing:
        raise InvalidParameterError("source", sorted(values), f"a dict with {', '.join(missing)} as well")
    fields = {key: values[key] for key in ("eval_batch_size", "study_name", "horizon") if key in values}
    return Recommendation(
        micro_batch_size=values["micro_batch_size"],
        accumulation_steps=values["accumulation_steps"],
        learning_rate=float(values["learning_rate"]),
        **{**fields, **extra},
    )
