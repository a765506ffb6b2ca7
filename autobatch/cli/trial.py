"""``autobatch trial``: run one trial of a config in a worker under a memory budget, and print its result.

Without ``--memory-budget`` the trial runs under the device's default share, and says on
stderr what that came to in bytes (so does a budget given as a share).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from autobatch.cli._common import add_task_arguments, trial_budget_from_args
from autobatch.core.memory import DEFAULT_SHARE, MemoryBudget, describe_budget


def add_command(commands) -> None:
    trial = commands.add_parser("trial", help="run one trial in a worker under a memory budget")
    add_task_arguments(trial)
    trial.add_argument("--micro-batch", type=int, required=True, help="micro-batch size")
    trial.add_argument("--accumulation", type=int, default=1, help="gradient-accumulation steps (default 1)")
    trial.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's base LR)")
    trial.add_argument("--timeout", type=float, default=None, help="seconds before the trial is stopped")
    trial.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from autobatch.core.config import TrialConfig
    from autobatch.core.memory import format_bytes
    from autobatch.process.worker import run_trial
    from autobatch.tasks.loading import load_task, task_framework

    memory_budget = _announced_budget(args.memory_budget, args.device)
    budget = trial_budget_from_args(args)
    workload = load_task(args.task)  # a task that does not load fails here, as bad input
    backend = task_framework(workload, args.backend)
    learning_rate = args.lr if args.lr is not None else workload.base_learning_rate
    config = TrialConfig(args.micro_batch, args.accumulation, learning_rate)
    result = run_trial(
        args.task,
        backend,
        config,
        memory_budget=memory_budget,
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
        (
            "config",
            f"micro-batch {config.micro_batch_size} x accumulation {config.accumulation_steps} "
            f"= {config.effective_batch_size}, lr {config.learning_rate:g}",
        ),
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


@dataclass(frozen=True)
class AnnouncedBudget(MemoryBudget):
    """A budget that, once resolved for a device, says on stderr what it became and why."""

    why: str | None = None

    def resolve(self, device: str = "cpu") -> int:
        nbytes = super().resolve(device)
        print(describe_budget(self, device, nbytes, self.why), file=sys.stderr, flush=True)
        return nbytes


def _announced_budget(given: str | None, device: str | None) -> str | MemoryBudget:
    """The trial's budget: the device's default share when none is given; a share announces its bytes."""
    if given is None:
        from autobatch.core.devices import default_device

        device = device or default_device()
        return AnnouncedBudget(fraction=DEFAULT_SHARE, why=f"the default on {device}, as no --memory-budget was given")
    parsed = MemoryBudget.parse(given)  # an unreadable budget is bad input before anything starts
    if parsed.fraction is not None:  # a share: say what it is in bytes on this device
        return AnnouncedBudget(fraction=parsed.fraction)
    return given
