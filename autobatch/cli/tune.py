"""``autobatch tune``: probe the memory wall, then search micro-batch, accumulation and learning rate."""

from __future__ import annotations

import argparse
import json

from autobatch.cli._common import (
    TuneProgress,
    add_distributed_arguments,
    add_search_arguments,
    add_storage_arguments,
    add_task_arguments,
    tune_arguments,
)
from autobatch.search.objectives import OBJECTIVES, PRUNERS


def add_command(commands) -> None:
    tune = commands.add_parser("tune", help="search micro-batch, accumulation and learning rate in an Optuna study")
    add_task_arguments(tune)
    tune.add_argument("--trials", type=int, default=20, help="search trials after the probe (default 20)")
    tune.add_argument(
        "--horizon",
        default=None,
        help="how long the run you will make trains: 3ep, 200k samples, 5000 steps, 2h; the recommendation "
        "is for that run (default: one epoch of the task's training split)",
    )
    tune.add_argument(
        "--study-time",
        default=None,
        help="how long the search may take, e.g. 15min or 1h: trials train as far toward the horizon as it "
        "allows, and the loss at the horizon is predicted where they stop short",
    )
    tune.add_argument("--timeout", type=float, default=None, help="--study-time in seconds")
    tune.add_argument("--trial-timeout", type=float, default=None, help="seconds before one trial is stopped")
    add_storage_arguments(tune)
    add_search_arguments(tune)
    tune.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="horizon: validation loss at the --horizon, trials continued toward it by successive halving "
        "(default for a new study); pareto: throughput and validation loss; goodput: throughput x "
        "statistical efficiency; time-to-target: validation loss within --train-seconds, pruned",
    )
    tune.add_argument(
        "--pruner",
        choices=PRUNERS,
        default=None,
        help="horizon and time-to-target: successive-halving (default), hyperband or none",
    )
    tune.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="train each trial for this many seconds of training instead of --samples samples "
        "(needed by --objective time-to-target)",
    )
    tune.add_argument(
        "--evaluations",
        type=int,
        default=4,
        help="with --train-seconds: validation losses measured per trial, evenly spaced (default 4)",
    )
    add_distributed_arguments(tune)
    tune.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.search.note import summary_text
    from autobatch.search.tune import tune

    progress = TuneProgress(args.trials, quiet=args.json)
    try:
        result = tune(
            **tune_arguments(args, seed=args.seed, on_trial=progress.trial_done, on_probe=progress.probe_done)
        )
    except BaseException:
        progress.close(erase=True)  # the error gets a line of its own
        raise
    progress.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else summary_text(result))
    return 0
