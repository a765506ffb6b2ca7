"""``autobatch worker``: join a shared study and add trials to it.

Every host runs the same ``autobatch worker`` command against one storage (PostgreSQL
for many machines). The first worker creates the study and probes the memory wall;
the others wait for that, then all add trials. See :mod:`autobatch.search.coordination`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from autobatch.cli._common import (
    TuneProgress,
    add_distributed_arguments,
    add_search_arguments,
    add_task_arguments,
    tune_arguments,
)


def add_command(commands) -> None:
    worker = commands.add_parser(
        "worker",
        help="join a shared study (PostgreSQL, SQLite or journal file) and add trials to it",
        description="Join study NAME in STORAGE (creating and probing it if no worker has yet) and run trials. "
        "Run the same command on every host; each host may run several workers (--workers).",
    )
    add_task_arguments(worker)
    worker.add_argument(
        "--storage",
        required=True,
        help="postgresql+psycopg://user:password@host:5432/db, sqlite:///file.db or journal:///file.log",
    )
    worker.add_argument("--study-name", required=True, help="the shared study's name")
    worker.add_argument("--trials", type=int, default=None, help="trials this command runs (its --workers share them)")
    worker.add_argument(
        "--study-trials",
        type=int,
        default=None,
        help="stop once the study holds this many complete trials, counting every worker's",
    )
    worker.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds")
    worker.add_argument("--trial-timeout", type=float, default=None, help="seconds before one trial is stopped")
    add_search_arguments(worker)  # what the worker that creates the study searches
    add_distributed_arguments(worker)
    worker.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.errors import InvalidParameterError
    from autobatch.search.note import summary_text
    from autobatch.search.tune import tune

    if args.trials is None and args.study_trials is None and args.timeout is None:
        raise InvalidParameterError("n_trials", None, "give --trials, --study-trials or --timeout")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a preempted host stops like Ctrl-C
    progress = TuneProgress(args.trials or args.study_trials, quiet=args.json)
    finished_here = []

    def on_trial(record) -> None:
        finished_here.append(record.number)
        progress.trial_done(record)

    try:
        # Every worker draws its own configs (seed None): equal seeds would draw the same ones.
        result = tune(**tune_arguments(args, seed=None, on_trial=on_trial, on_probe=progress.probe_done))
    except KeyboardInterrupt:
        progress.close(erase=True)
        print(
            f"autobatch worker: interrupted after {len(finished_here)} trials here; a running trial is recorded "
            "as failed and queued again, and the study stays as it was",
            file=sys.stderr,
        )
        return 130
    except BaseException:
        progress.close(erase=True)  # the error gets a line of its own
        raise
    progress.close()
    if args.json:
        print(json.dumps({**result.to_dict(), "trials_here": finished_here}, indent=2))
    else:
        print(summary_text(result))
    return 0
