"""``autobatch worker``: join a shared study and add trials to it; ``--workers N`` for ``tune`` too.

Every host runs the same ``autobatch worker`` command against one storage (PostgreSQL
for many machines). The first worker creates the study and probes the memory wall;
the others wait for that, then all add trials. See :mod:`autobatch.search.distributed`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys


def add_worker_commands(commands, add_task_arguments) -> None:
    worker = commands.add_parser(
        "worker",
        help="join a shared study (PostgreSQL, SQLite or journal file) and add trials to it",
        description="Join study NAME in STORAGE (creating and probing it if no worker has yet) and run trials. "
        "Run the same command on every host; each host may run several workers (--workers).",
    )
    add_task_arguments(worker)
    worker.add_argument("--storage", required=True,
                        help="postgresql+psycopg://user:password@host:5432/db, sqlite:///file.db or journal:///file.log")
    worker.add_argument("--study-name", required=True, help="the shared study's name")
    worker.add_argument("--trials", type=int, default=None,
                        help="trials this command runs (its --workers share them)")
    worker.add_argument("--study-trials", type=int, default=None,
                        help="stop once the study holds this many complete trials, counting every worker's")
    worker.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds")
    worker.add_argument("--trial-timeout", type=float, default=None, help="seconds before one trial is stopped")
    add_search_arguments(worker)
    add_distributed_arguments(worker)
    worker.set_defaults(handler=_run_worker_command)

    tune = commands.choices.get("tune")
    if tune is not None:
        add_distributed_arguments(tune)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """What the worker that creates the study searches (the same options as ``autobatch tune``)."""
    parser.add_argument("--sampler", default="tpe", help="tpe (default), nsga2, gp or random")
    parser.add_argument("--loss-tolerance", type=float, default=0.02, help="loss slack for the recommendation (default 0.02 = 2%%)")
    parser.add_argument("--safety-margin", type=float, default=0.05, help="memory kept free below the budget (default 0.05)")
    parser.add_argument("--min-micro-batch", type=int, default=1)
    parser.add_argument("--max-micro-batch", type=int, default=None, help="default: the probe's memory wall")
    parser.add_argument("--powers-of-two", action="store_true", help="search micro-batches that are powers of two")
    parser.add_argument("--max-accumulation", type=int, default=8)
    parser.add_argument("--lr-rule", default=None, help="linear, sqrt, adascale or absolute (default: sqrt for Adam, linear for SGD; adascale with --objective goodput)")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    from autobatch.search.distributed import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL

    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine, one GPU each where there are several (default 1)")
    parser.add_argument("--heartbeat-interval", type=int, default=DEFAULT_HEARTBEAT_INTERVAL,
                        help=f"seconds between a running trial's heartbeats; 0 turns them off (default {DEFAULT_HEARTBEAT_INTERVAL})")
    parser.add_argument("--grace-period", type=int, default=DEFAULT_GRACE_PERIOD,
                        help="seconds without a heartbeat before a trial counts as lost, is failed and queued again "
                             f"(default {DEFAULT_GRACE_PERIOD})")


def distributed_options(args: argparse.Namespace) -> dict:
    """``tune()`` keyword arguments from :func:`add_distributed_arguments`'s options."""
    interval = getattr(args, "heartbeat_interval", None)
    return {
        "n_workers": getattr(args, "workers", 1),
        "heartbeat_interval": None if interval == 0 else interval,
        "grace_period": getattr(args, "grace_period", None),
    }


def search_space_from_args(args: argparse.Namespace):
    from autobatch.search.space import SearchSpace

    return SearchSpace(
        min_micro_batch=args.min_micro_batch,
        max_micro_batch=args.max_micro_batch,
        powers_of_two=args.powers_of_two,
        max_accumulation=args.max_accumulation,
        lr_rule=args.lr_rule,
    )


def _run_worker_command(args: argparse.Namespace) -> int:
    from autobatch.cli.main import trial_budget_from_args
    from autobatch.cli.study import _Progress
    from autobatch.errors import InvalidParameterError
    from autobatch.search.note import summary_text
    from autobatch.search.study import tune

    if args.trials is None and args.study_trials is None and args.timeout is None:
        raise InvalidParameterError("n_trials", None, "give --trials, --study-trials or --timeout")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a preempted host stops like Ctrl-C
    space = search_space_from_args(args)
    progress = _Progress(args.trials or args.study_trials, quiet=args.json)
    finished_here = []

    def on_trial(record) -> None:
        finished_here.append(record.number)
        progress.trial_done(record)

    try:
        result = tune(
            args.task,
            args.backend,
            memory_budget=args.memory_budget,
            n_trials=args.trials,
            study_trials=args.study_trials,
            timeout=args.timeout,
            storage=args.storage,
            study_name=args.study_name,
            search_space=space,
            sampler=args.sampler,
            seed=None,  # every worker draws its own configs: equal seeds would draw the same ones
            loss_tolerance=args.loss_tolerance,
            safety_margin=args.safety_margin,
            trial_budget=trial_budget_from_args(args),
            device=args.device,
            trial_timeout=args.trial_timeout,
            on_trial=on_trial,
            on_probe=progress.probe_done,
            **distributed_options(args),
        )
    except KeyboardInterrupt:
        _close_quietly(progress)
        print(
            f"autobatch worker: interrupted after {len(finished_here)} trials here; a running trial is recorded "
            "as failed and queued again, and the study stays as it was",
            file=sys.stderr,
        )
        return 130
    except BaseException:
        _close_quietly(progress)  # the error gets a line of its own
        raise
    progress.close()
    if args.json:
        print(json.dumps({**result.to_dict(), "trials_here": finished_here}, indent=2))
    else:
        print(summary_text(result))
    return 0


def _close_quietly(progress) -> None:
    """Close the progress bar and erase it."""
    progress.bar.leave = False
    progress.close()
