"""The ``autobatch`` command line.

``trial`` runs one trial, ``tune`` a study and ``show`` prints a stored one; ``worker``
joins a shared study, ``train`` trains with a config, ``dashboard`` and ``report``
inspect a study, ``devices`` says what autobatch sees.

Bad input ends with one line on stderr that names the option, and exit code 2;
a trial that runs out of memory is a result, not a failure (exit 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from autobatch.errors import AutobatchError, InvalidParameterError

# Python parameter names as the command line spells them, for error messages.
_FLAGS = {
    "micro_batch_size": "--micro-batch",
    "accumulation_steps": "--accumulation",
    "learning_rate": "--lr",
    "memory_budget": "--memory-budget",
    "train_samples": "--samples",
    "timeout": "--timeout",
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
    "eval_batch_size": "--eval-batch-size",
    "num_workers": "--num-workers",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except InvalidParameterError as error:
        flag = _FLAGS.get(error.parameter, error.parameter)
        print(f"autobatch {args.command}: error: {flag}={error.value!r} is invalid: {error.allowed}", file=sys.stderr)
        return 2
    except AutobatchError as error:
        print(f"autobatch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autobatch {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobatch",
        description="Find the micro-batch size, accumulation steps and learning rate that train fastest without OOM.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    trial = commands.add_parser("trial", help="run one trial in a worker under a memory budget")
    _add_task_arguments(trial)
    trial.add_argument("--micro-batch", type=int, required=True, help="micro-batch size")
    trial.add_argument("--accumulation", type=int, default=1, help="gradient-accumulation steps (default 1)")
    trial.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's base LR)")
    trial.add_argument("--timeout", type=float, default=None, help="seconds before the trial is stopped")
    trial.set_defaults(handler=_run_trial_command)

    from autobatch.cli.dashboard import add_dashboard_commands
    from autobatch.cli.devices import add_device_commands
    from autobatch.cli.study import add_study_commands
    from autobatch.cli.train import add_train_commands
    from autobatch.cli.worker import add_worker_commands

    add_study_commands(commands, _add_task_arguments)
    add_train_commands(commands, _add_task_arguments)
    add_worker_commands(commands, _add_task_arguments)
    add_dashboard_commands(commands)
    add_device_commands(commands)
    return parser


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", metavar="TASK", help="a study name (digits-mlp, digits-cnn, synthetic-images) or package.module:factory")
    parser.add_argument("--backend", default="torch", help="framework backend: torch or tensorflow (default torch)")
    parser.add_argument("--memory-budget", default=None, help="e.g. 1.5GiB, 800MB or 75%% (of the device, or of available RAM on CPU)")
    parser.add_argument("--samples", type=int, default=2048, help="samples trained per trial before validation (default 2048)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="validation batch size (default: the micro-batch)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (PyTorch)")
    parser.add_argument("--mixed-precision", action="store_true", help="train with autocast / mixed_float16")
    parser.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if a GPU is visible, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="let the trial worker's own output through")


def trial_budget_from_args(args: argparse.Namespace):
    from autobatch.core.config import TrialBudget

    return TrialBudget(
        train_samples=args.samples,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
    )


def _run_trial_command(args: argparse.Namespace) -> int:
    from autobatch.core.config import TrialConfig
    from autobatch.core.memory import MemoryBudget, format_bytes
    from autobatch.process.worker import run_trial
    from autobatch.tasks.workload import load_workload

    budget = trial_budget_from_args(args)
    if args.memory_budget is not None:
        MemoryBudget.parse(args.memory_budget)
    workload = load_workload(args.task)  # a task that does not load fails here, as bad input
    learning_rate = args.lr if args.lr is not None else workload.base_learning_rate
    config = TrialConfig(args.micro_batch, args.accumulation, learning_rate)
    result = run_trial(
        args.task,
        args.backend,
        config,
        memory_budget=args.memory_budget,
        budget=budget,
        device=args.device,
        timeout=args.timeout,
        verbose=args.verbose,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    rows = [
        ("status", result.status + (f" (in {result.oom_phase})" if result.oom_phase else "")),
        ("config", f"micro-batch {config.micro_batch_size} x accumulation {config.accumulation_steps} "
                   f"= {config.effective_batch_size}, lr {config.learning_rate:g}"),
        ("throughput", f"{result.samples_per_second:.1f} samples/s" if result.samples_per_second else "-"),
        ("validation loss", f"{result.val_loss:.4f}" if result.val_loss is not None else "-"),
        ("peak memory", format_bytes(result.peak_memory_bytes)),
        ("memory budget", format_bytes(result.memory_budget_bytes)),
        ("device", f"{result.framework} on {result.device}"),
        ("wall time", f"{result.timings.get('wall', 0):.1f} s"),
    ]
    if result.error:
        rows.append(("reason", result.error.splitlines()[0]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
