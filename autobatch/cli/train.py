"""``autobatch train``: train a task with a study's recommended config, or a given one.

The training runs in a child process under the memory budget (see :mod:`autobatch.training`);
this process shows its progress on stderr and prints the result. An OOM that stops
training is one line on stderr and exit code 1; bad input is exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from autobatch.cli._common import add_task_arguments

if TYPE_CHECKING:
    from tqdm import tqdm

# How this command spells the parameters of train() that the other commands spell otherwise or lack.
TRAIN_FLAGS = {
    "study_name": "--from-study",
    "epochs": "--epochs",
    "max_samples": "--samples",
    "grow_after": "--grow-after",
    "output": "--output",
    "seed": "--seed",
    "checkpoint_every": "--checkpoint-every",
}


def add_command(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a task with a study's recommended config (or a given one), adapting the micro-batch to memory",
        description="Train TASK with the config a study recommends (--from-study) or the one given "
        "(--micro-batch, --accumulation, --lr), under a real memory budget. With --adaptive a micro-batch that "
        "runs out of memory is split and its window redone: the effective batch, the learning rate and the "
        "sample order stay as they were.",
    )
    add_task_arguments(train)
    helps = {  # what the shared options mean here rather than for a trial
        "samples": "stop after this many training samples (default: every sample, every epoch)",
        "num_workers": argparse.SUPPRESS,  # refused below: train gathers its windows from arrays in memory
        "verbose": "let the training process's own output through",
    }
    for action in train._actions:
        action.help = helps.get(action.dest, action.help)
    train.set_defaults(samples=None)
    source = train.add_argument_group("config (a study's recommendation, or given)")
    source.add_argument("--from-study", metavar="NAME", default=None, help="take the config a study recommends")
    source.add_argument("--storage", default=None, help="the study's storage URL (default sqlite:///autobatch.db)")
    source.add_argument("--micro-batch", type=int, default=None, help="micro-batch size")
    source.add_argument("--accumulation", type=int, default=None, help="gradient-accumulation steps (default 1)")
    source.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's base LR)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training set (default 1)")
    train.add_argument(
        "--adaptive",
        action="store_true",
        help="on an OOM, halve the micro-batch and double the accumulation for that window, and redo it",
    )
    train.add_argument(
        "--max-micro-batch",
        type=int,
        default=None,
        help="largest micro-batch to grow back to (default: the study's memory wall, or --micro-batch)",
    )
    train.add_argument(
        "--grow-after",
        type=int,
        default=16,
        help="clean windows before trying twice the micro-batch again (default 16)",
    )
    train.add_argument("--no-grow", action="store_true", help="never grow the micro-batch back after an OOM")
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="with --adaptive, checkpoint every N steps to resume from if the framework dies of an OOM "
        "(default: on the CPU, where an OOM can leave the process unable to go on, as often as it costs "
        "under 5%% of the time)",
    )
    train.add_argument(
        "--output",
        "-o",
        default=None,
        help="write the trained model here (PyTorch: state_dict; Keras: .keras or .weights.h5; "
        "either: .npz), only once training has finished",
    )
    train.set_defaults(handler=run, flag_names=TRAIN_FLAGS)


def run(args: argparse.Namespace) -> int:
    from autobatch.errors import InvalidParameterError
    from autobatch.training.api import TrainingError, train

    if args.num_workers:
        raise InvalidParameterError(
            "num_workers",
            args.num_workers,
            "train gathers each window from arrays in memory and starts no data-loading workers; leave it out",
        )
    progress = TrainProgress(quiet=False)
    try:
        result = train(
            args.task,
            args.backend,
            micro_batch_size=args.micro_batch,
            accumulation_steps=args.accumulation,
            learning_rate=args.lr,
            study_name=args.from_study,
            storage=args.storage,
            epochs=args.epochs,
            max_samples=args.samples,
            adaptive=args.adaptive,
            max_micro_batch=args.max_micro_batch,
            grow_after=None if args.no_grow else args.grow_after,
            memory_budget=args.memory_budget,
            device=args.device,
            seed=args.seed,
            eval_batch_size=args.eval_batch_size,
            mixed_precision=args.mixed_precision,
            output=args.output,
            checkpoint_every=args.checkpoint_every,
            on_event=progress.event,
            verbose=args.verbose,
        )
    except InvalidParameterError:
        progress.close()  # the error line follows it (see main)
        raise
    except TrainingError as error:
        progress.close()
        print(f"autobatch train: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    progress.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(summary_text(result))
    return 0


def summary_text(result) -> str:
    from autobatch.core.memory import format_bytes

    config = result.config
    rows = [
        ("task", f"{result.task} ({result.backend} on {result.device})"),
        (
            "config",
            f"micro-batch {config.micro_batch_size} x accumulation {config.accumulation_steps} "
            f"= {config.effective_batch_size}, lr {config.learning_rate:g}",
        ),
        ("effective batch", ", ".join(str(size) for size in result.effective_batch_sizes) + " samples per step"),
        ("trained", f"{result.epochs} epoch(s), {result.steps} steps, {result.samples_seen} samples"),
        ("validation loss", f"{result.val_loss:.4f}"),
        ("train loss", " -> ".join(f"{loss:.4f}" for loss in result.epoch_losses) or "-"),
        ("throughput", f"{result.samples_per_second:.1f} samples/s" if result.samples_per_second else "-"),
        (
            "adaptations",
            str(len(result.adaptations))
            + (f", final micro-batch {result.final_micro_batch_size}" if result.adaptations else ""),
        ),
        ("peak memory", format_bytes(result.peak_memory_bytes)),
        ("memory budget", format_bytes(result.memory_budget_bytes)),
        ("wall time", f"{result.timings.get('wall', 0):.1f} s"),
    ]
    if result.restarts:
        rows.append(("restarts", f"{result.restarts} (the framework crashed on an OOM; resumed from a checkpoint)"))
    if result.output:
        rows.append(("model", result.output))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for adaptation in result.adaptations:
        lines.append(f"  step {adaptation.step:>5}: {describe_adaptation(adaptation)}")
    return "\n".join(lines)


def describe_adaptation(adaptation) -> str:
    reason = {
        "oom": "out of memory, window redone",
        "crash": "OOM crash, window redone in a new process",
        "grow": "clean windows, growing back",
    }[adaptation.cause]
    return (
        f"micro-batch {adaptation.old_micro_batch} x {adaptation.old_accumulation} -> "
        f"{adaptation.new_micro_batch} x {adaptation.new_accumulation} "
        f"(effective {adaptation.effective_batch_size}; {reason})"
    )


class TrainProgress:
    """A progress bar on stderr: epoch, step, loss, samples/s, and a line per adaptation."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: tqdm | None = None  # made at the first window, so start-up time does not count as training

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif not self.quiet:
            print(line, file=sys.stderr)

    def event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "window":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=event["steps"],
                    initial=event["step"] - 1,
                    unit="step",
                    file=sys.stderr,
                    disable=self.quiet,
                    dynamic_ncols=True,
                    mininterval=0.5,
                )
            self.bar.set_description(f"epoch {event['epoch']}/{event['epochs']}", refresh=False)
            speed = event.get("samples_per_second")
            self.bar.set_postfix_str(
                f"loss {event['loss']:.4f}, {speed:.1f} samples/s, micro {event['micro']}x{event['accumulation']}"
                if speed
                else f"loss {event['loss']:.4f}",
                refresh=False,
            )
            self.bar.update(event["step"] - self.bar.n)
        elif kind == "adaptation":
            from autobatch.core.adaptive import Adaptation

            adaptation = Adaptation.from_dict(event)
            self._write(f"step {adaptation.step}: {describe_adaptation(adaptation)}: {adaptation.detail}")
        elif kind == "restart":
            self._write(
                f"step {event['step']}: out of memory ({event['detail']}); "
                f"resuming in a new process from step {event['from_step']}"
            )
        elif kind == "evaluating" and self.bar is not None:
            self.bar.set_description("evaluating", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
