"""``autobatch tune`` and ``autobatch show``: run a study, or print a stored one."""

from __future__ import annotations

import argparse
import json
import sys

from autobatch.search.objectives import OBJECTIVES, PRUNERS


def add_study_commands(commands, add_task_arguments) -> None:
    tune = commands.add_parser("tune", help="search micro-batch, accumulation and learning rate in an Optuna study")
    add_task_arguments(tune)
    tune.add_argument("--trials", type=int, default=20, help="search trials after the probe (default 20)")
    tune.add_argument("--timeout", type=float, default=None, help="stop the search after this many seconds")
    tune.add_argument("--trial-timeout", type=float, default=None, help="seconds before one trial is stopped")
    _add_storage_arguments(tune)
    tune.add_argument("--sampler", default="tpe", help="tpe (default), nsga2, gp or random")
    tune.add_argument("--loss-tolerance", type=float, default=0.02, help="loss slack for the recommendation (default 0.02 = 2%%)")
    tune.add_argument("--safety-margin", type=float, default=0.05, help="memory kept free below the budget (default 0.05)")
    tune.add_argument("--min-micro-batch", type=int, default=1)
    tune.add_argument("--max-micro-batch", type=int, default=None, help="default: the probe's memory wall")
    tune.add_argument("--powers-of-two", action="store_true", help="search micro-batches that are powers of two")
    tune.add_argument("--max-accumulation", type=int, default=8)
    tune.add_argument("--lr-rule", default=None,
                      help="linear, sqrt, adascale (gain from the measured gradient noise scale) or absolute "
                           "(default: sqrt for Adam, linear for SGD; adascale for --objective goodput)")
    tune.add_argument("--objective", choices=OBJECTIVES, default=None,
                      help="pareto: throughput and validation loss (default for a new study); goodput: throughput x "
                           "statistical efficiency; time-to-target: validation loss within --train-seconds, pruned")
    tune.add_argument("--pruner", choices=PRUNERS, default=None,
                      help="time-to-target only: successive-halving (default), hyperband or none")
    tune.add_argument("--train-seconds", type=float, default=None,
                      help="train each trial for this many seconds of training instead of --samples samples "
                           "(needed by --objective time-to-target)")
    tune.add_argument("--evaluations", type=int, default=4,
                      help="with --train-seconds: validation losses measured per trial, evenly spaced (default 4)")
    tune.set_defaults(handler=_run_tune_command)

    show = commands.add_parser("show", help="print a stored study's recommendation and Pareto front")
    _add_storage_arguments(show)
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(handler=_run_show_command)


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autobatch.db)")
    parser.add_argument("--study-name", default=None, help="study name (default TASK-BACKEND)")


def _run_tune_command(args: argparse.Namespace) -> int:
    from autobatch.cli.worker import distributed_options
    from autobatch.search.note import summary_text
    from autobatch.search.space import SearchSpace
    from autobatch.search.study import tune

    space = SearchSpace(
        min_micro_batch=args.min_micro_batch,
        max_micro_batch=args.max_micro_batch,
        powers_of_two=args.powers_of_two,
        max_accumulation=args.max_accumulation,
        lr_rule=args.lr_rule,
    )
    progress = _Progress(args.trials, quiet=args.json)
    trial_budget = _trial_budget(args)
    result = tune(
        args.task,
        args.backend,
        memory_budget=args.memory_budget,
        n_trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        search_space=space,
        sampler=args.sampler,
        seed=args.seed,
        loss_tolerance=args.loss_tolerance,
        safety_margin=args.safety_margin,
        trial_budget=trial_budget,
        device=args.device,
        trial_timeout=args.trial_timeout,
        on_trial=progress.trial_done,
        on_probe=progress.probe_done,
        objective=args.objective,
        pruner=args.pruner,
        **distributed_options(args),  # --workers, --heartbeat-interval, --grace-period (cli_worker.py)
    )
    progress.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(summary_text(result))
    return 0


def _trial_budget(args: argparse.Namespace):
    """The trial budget of ``autobatch tune``: the common options plus the time budget's."""
    import dataclasses

    from autobatch.cli.main import trial_budget_from_args
    from autobatch.errors import InvalidParameterError

    try:
        return dataclasses.replace(
            trial_budget_from_args(args), train_seconds=args.train_seconds, evaluations=args.evaluations
        )
    except InvalidParameterError as error:
        flags = {"train_seconds": "--train-seconds", "evaluations": "--evaluations"}
        raise InvalidParameterError(flags.get(error.parameter, error.parameter), error.value, error.allowed) from None


def _run_show_command(args: argparse.Namespace) -> int:
    from autobatch.errors import InvalidParameterError
    from autobatch.search.note import summary_text
    from autobatch.search.study import DEFAULT_STORAGE, load_study_result

    if not args.study_name:
        raise InvalidParameterError("study_name", args.study_name, "name the study to show")
    result = load_study_result(args.storage or DEFAULT_STORAGE, args.study_name)
    print(json.dumps(result.to_dict(), indent=2) if args.json else summary_text(result))
    return 0


class _Progress:
    """A live progress bar on stderr: trial n/N and the best feasible throughput so far."""

    def __init__(self, total: int | None, quiet: bool):
        from tqdm import tqdm

        self.quiet = quiet
        self.best: float | None = None
        self.bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr, disable=quiet, dynamic_ncols=True)

    def probe_done(self, micro_batch: int, result) -> None:
        if not self.quiet:
            from autobatch.core.memory import format_bytes

            self.bar.write(
                f"probe  micro-batch {micro_batch:>6}: {result.status:<7} peak {format_bytes(result.peak_memory_bytes)}",
                file=sys.stderr,
            )

    def trial_done(self, record) -> None:
        config = record.config
        result = record.result
        measured = _measured(record)
        if record.feasible and measured and (self.best is None or measured[0] > self.best):
            self.best = measured[0]
        if record.skipped_by_model:
            outcome = "skipped: predicted over budget"
        elif result is not None and result.status != "ok":
            outcome = result.status + (f" in {result.oom_phase}" if result.oom_phase else "")
        elif measured:
            outcome = f"{measured[0]:8.1f} samples/s  loss {measured[1]:.4f}"
            if result is not None and result.pruned and result.intermediate_losses:
                outcome += f"  pruned after {result.intermediate_losses[-1]['train_seconds']:.1f} s"
            elif result is not None and result.noise_scale is not None:
                outcome += f"  B_noise {result.noise_scale:.0f}"
        else:  # another worker's trial under a single objective: its value is all there is
            outcome = "pruned" if record.pruned else "value " + "  ".join(f"{v:.4g}" for v in record.values or ())
        self.bar.write(
            f"trial {record.number:>3}  m={config.micro_batch_size:<5} k={config.accumulation_steps:<3} "
            f"lr={config.learning_rate:.2e}  {outcome}",
            file=sys.stderr,
        )
        if self.best is not None:
            self.bar.set_postfix_str(f"best {self.best:.1f} samples/s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _measured(record) -> tuple[float, float] | None:
    """(samples/s, validation loss) of a finished trial, from its result or, for another worker's, its values."""
    result = record.result
    if result is not None and result.val_loss is not None:
        return float(result.samples_per_second or 0.0), float(result.val_loss)
    if record.values and len(record.values) == 2:  # the pareto objective's values are just that
        return float(record.values[0]), float(record.values[1])
    return None
