"""What the commands share: their common options, turning options into library calls, the tune progress bar.

A command module declares its own parser and handler and takes what it shares with another
command from here, so no command module imports another.
"""

from __future__ import annotations

import argparse
import sys

#: Python parameter names as the command line spells them, for error messages (a command may add its own)
FLAGS = {
    "micro_batch_size": "--micro-batch",
    "accumulation_steps": "--accumulation",
    "learning_rate": "--lr",
    "memory_budget": "--memory-budget",
    "train_samples": "--samples",
    "max_trial_samples": "--samples",
    "timeout": "--timeout",
    "study_time": "--study-time",
    "horizon": "--horizon",
    "backend": "--backend",
    "task": "TASK",
    "n_trials": "--trials",
    "storage": "--storage",
    "study_name": "--study-name",
    "sampler": "--sampler",
    "loss_tolerance": "--loss-tolerance",
    "safety_margin": "--safety-margin",
    "max_accumulation": "--max-accumulation",
    "min_micro_batch": "--min-micro-batch",
    "max_micro_batch": "--max-micro-batch",
    "max_effective_batch": "--max-effective-batch",
    "eval_batch_size": "--eval-batch-size",
    "num_workers": "--num-workers",
    "train_seconds": "--train-seconds",
    "evaluations": "--evaluations",
}


# --- options ------------------------------------------------------------------------------------


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """TASK and what one run of it needs: ``trial``, ``tune``, ``worker`` and ``train`` take these."""
    from autobatch.studies import STUDIES

    parser.add_argument(
        "task",
        metavar="TASK",
        help=f"a study name ({', '.join(STUDIES)}) or package.module:factory, a module in the working directory "
        "or on sys.path",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="framework backend: torch or tensorflow (default: the task's own; torch for a study that has both)",
    )
    parser.add_argument(
        "--memory-budget", default=None, help="e.g. 1.5GiB, 800MB or 75%% (of the device, or of available RAM on CPU)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples trained per trial before validation (trial: default 2048; tune: the most one search trial "
        "trains, default: as far toward --horizon as --study-time allows)",
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=None, help="validation batch size (default: the micro-batch)"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (PyTorch)")
    parser.add_argument("--mixed-precision", action="store_true", help="train with autocast / mixed_float16")
    parser.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if a GPU is visible, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="let the trial worker's own output through")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a study is kept, for ``tune`` and ``show``."""
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autobatch.db)")
    parser.add_argument("--study-name", default=None, help="study name (default TASK-BACKEND)")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """What a study searches: ``tune``, and ``worker`` for the worker that creates the study."""
    parser.add_argument("--sampler", default="tpe", help="tpe (default), nsga2, gp or random")
    parser.add_argument(
        "--loss-tolerance", type=float, default=0.02, help="loss slack for the recommendation (default 0.02 = 2%%)"
    )
    parser.add_argument(
        "--safety-margin", type=float, default=0.05, help="memory kept free below the budget (default 0.05)"
    )
    parser.add_argument("--min-micro-batch", type=int, default=1)
    parser.add_argument("--max-micro-batch", type=int, default=None, help="default: the probe's memory wall")
    parser.add_argument("--powers-of-two", action="store_true", help="search micro-batches that are powers of two")
    parser.add_argument("--max-accumulation", type=int, default=8)
    parser.add_argument(
        "--max-effective-batch",
        type=int,
        default=None,
        help="largest micro-batch x accumulation searched (default: the horizon's samples in 16 optimizer steps)",
    )
    parser.add_argument(
        "--lr-rule",
        default=None,
        help="linear, sqrt, adascale (gain from the measured gradient noise scale) or absolute "
        "(default: sqrt for Adam, linear for SGD; adascale for --objective goodput)",
    )


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """How many workers share a study here, and how a lost trial is noticed: ``tune`` and ``worker``."""
    from autobatch.search.coordination import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL

    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine, one GPU each where there are several (default 1)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        help=f"seconds between a running trial's heartbeats; 0 turns them off (default {DEFAULT_HEARTBEAT_INTERVAL})",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=DEFAULT_GRACE_PERIOD,
        help="seconds without a heartbeat before a trial counts as lost, is failed and queued again "
        f"(default {DEFAULT_GRACE_PERIOD})",
    )


# --- options into library calls -------------------------------------------------------------------


def tune_arguments(args: argparse.Namespace, *, seed: int | None, on_trial, on_probe) -> dict:
    """The keyword arguments of :func:`~autobatch.search.tune.tune` from the options of ``tune`` or ``worker``.

    ``seed`` is the sampler's (``tune`` gives ``--seed``; every worker draws its own configs).
    Options only one of the commands has (``--study-trials``, ``--objective``, ``--pruner``)
    are passed when the command has them; the other gets ``tune()``'s defaults.
    """
    only_some = {
        name: getattr(args, name) for name in ("study_trials", "objective", "pruner", "horizon") if hasattr(args, name)
    }
    return dict(
        task=args.task,
        backend=args.backend,
        memory_budget=args.memory_budget,
        n_trials=args.trials,
        timeout=study_seconds(args),
        max_trial_samples=args.samples,
        storage=args.storage,
        study_name=args.study_name,
        search_space=search_space_from_args(args),
        sampler=args.sampler,
        seed=seed,
        loss_tolerance=args.loss_tolerance,
        safety_margin=args.safety_margin,
        trial_budget=trial_budget_from_args(args),
        device=args.device,
        trial_timeout=args.trial_timeout,
        on_trial=on_trial,
        on_probe=on_probe,
        **only_some,
        **distributed_options(args),
    )


def study_seconds(args: argparse.Namespace) -> float | None:
    """The study's time, from ``--timeout`` (seconds) or ``--study-time`` (a duration such as ``15min``)."""
    given = getattr(args, "study_time", None)
    if given is None:
        return args.timeout
    from autobatch.errors import InvalidParameterError
    from autobatch.search.horizon import Horizon

    if args.timeout is not None:
        raise InvalidParameterError("study_time", given, "give --study-time or --timeout, not both")
    duration = Horizon.parse(given, "study_time")
    if not duration.is_time:
        raise InvalidParameterError("study_time", given, "must be a duration such as '15min', '2h' or '900s'")
    return duration.amount


def trial_budget_from_args(args: argparse.Namespace):
    """The :class:`~autobatch.core.config.TrialBudget` of :func:`add_task_arguments`'s options.

    With ``tune``'s ``--train-seconds`` and ``--evaluations`` where the command has them.
    """
    from autobatch.core.config import TrialBudget

    time_budget = {name: getattr(args, name) for name in ("train_seconds", "evaluations") if hasattr(args, name)}
    return TrialBudget(
        train_samples=args.samples or TrialBudget.train_samples,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        **time_budget,
    )


def search_space_from_args(args: argparse.Namespace):
    """The :class:`~autobatch.search.space.SearchSpace` of :func:`add_search_arguments`'s options."""
    from autobatch.search.space import SearchSpace

    return SearchSpace(
        min_micro_batch=args.min_micro_batch,
        max_micro_batch=args.max_micro_batch,
        powers_of_two=args.powers_of_two,
        max_accumulation=args.max_accumulation,
        max_effective_batch=args.max_effective_batch,
        lr_rule=args.lr_rule,
    )


def distributed_options(args: argparse.Namespace) -> dict:
    """``tune()`` keyword arguments from :func:`add_distributed_arguments`'s options."""
    interval = getattr(args, "heartbeat_interval", None)
    return {
        "n_workers": getattr(args, "workers", 1),
        "heartbeat_interval": None if interval == 0 else interval,
        "grace_period": getattr(args, "grace_period", None),
    }


# --- the tune progress bar ------------------------------------------------------------------------


class TuneProgress:
    """A live progress bar on stderr: trial n/N and the best feasible throughput so far.

    The bar is drawn at the first probe or trial, not before: bad input found before any is
    then reported on a line of its own. ``close(erase=True)`` takes the bar away before an error.
    """

    def __init__(self, total: int | None, quiet: bool):
        self.total = total
        self.quiet = quiet
        self.best: float | None = None
        self._bar = None

    @property
    def bar(self):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc="trials", unit="trial", file=sys.stderr, disable=self.quiet, dynamic_ncols=True
            )
        return self._bar

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
                last = result.intermediate_losses[-1]
                trained = f"{last['samples']} samples" if "samples" in last else f"{last['train_seconds']:.1f} s"
                outcome += f"  pruned after {trained}"
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

    def close(self, erase: bool = False) -> None:
        """Close the bar (if it was ever drawn); ``erase`` takes it off the screen, for an error line to follow."""
        if self._bar is None:
            return
        if erase:
            self._bar.leave = False
        self._bar.close()


def _measured(record) -> tuple[float, float] | None:
    """(samples/s, validation loss) of a finished trial, from its result or, for another worker's, its values."""
    result = record.result
    if result is not None and result.val_loss is not None:
        return float(result.samples_per_second or 0.0), float(result.val_loss)
    if record.values and len(record.values) == 2:  # the pareto objective's values are just that
        return float(record.values[0]), float(record.values[1])
    return None
