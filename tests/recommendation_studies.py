"""A stored autobatch study written directly (no trial run): what the integrations and ``export`` read.

It holds what :func:`~autobatch.search.results.summarize` reads: the study's settings, the probe's
wall and finished trials with their user attrs, as a real search stores them.
"""

from __future__ import annotations

#: the recommendation :func:`store_study` stores, and the probe wall (the eval batch size)
RECOMMENDED = {"micro_batch_size": 4, "accumulation_steps": 3, "learning_rate": 0.03}
MAX_MICRO_BATCH = 24


def store_study(storage: str, study_name: str, *, feasible: bool = True) -> None:
    """A study whose recommendation is :data:`RECOMMENDED`, or, with ``feasible=False``, has none."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=["maximize", "minimize"])
    study.set_user_attr("autobatch", {"task": "tests.tasks:tiny", "backend": "torch", "memory_budget_bytes": 2**30})
    study.set_user_attr("autobatch_probe", {"max_micro_batch": MAX_MICRO_BATCH})
    micro, accumulation = RECOMMENDED["micro_batch_size"], RECOMMENDED["accumulation_steps"]
    attrs = {
        **RECOMMENDED,
        "effective_batch_size": micro * accumulation,
        "feasible": feasible,
        "peak_memory_bytes": 2**28,
    }
    study.add_trial(optuna.trial.create_trial(values=[500.0, 0.4], user_attrs=attrs))
