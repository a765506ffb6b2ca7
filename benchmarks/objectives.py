"""When to pick which objective: one task tuned three ways, each recommendation then trained longer.

    .venv/bin/python benchmarks/objectives.py [--quick] [--threads 1]

1. Three studies of the same task, memory budget and number of trials on PyTorch (CPU):
   ``objective="pareto"`` and ``"goodput"`` train each trial on a fixed number of samples,
   ``"time-to-target"`` for a fixed training time T (successive-halving pruning at
   T/4, 2T/4, 3T/4).
2. Each study's recommendation is trained again, alternately, for 4 T of training
   time with the validation loss measured 12 times: learning curves against wall-clock
   training time (evaluation not counted), the median of the repeats. Each is also
   trained on the pareto studies' fixed sample budget, the measure pareto ranks by.
3. The cost of the gradient-noise-scale estimate: the trial loop's window step at
   accumulation 4 with the estimate on and off (``GradientNoiseMeter`` on PyTorch,
   ``MicroBatchTrainer(measure_noise=...)`` on TensorFlow), in alternating blocks, CPU
   time of one single-threaded process per framework; the overhead is the median of
   the paired on/off ratios − 1. Data loading and evaluation, which a trial also spends
   time on, are left out, so this is the most the estimate can add to a trial.

Writes ``results/objectives.md`` and ``results/objectives.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Run,
    markdown_table,
    median,
    new_figure,
    parse_args,
    save_plot,
    write_markdown,
)

TASK = "digits-cnn"
BACKEND = "torch"
MEMORY_BUDGET = "2GiB"
TRAIN_SAMPLES = 2048  # the pareto and goodput studies' sample budget per trial
OBJECTIVES = ("pareto", "goodput", "time-to-target")
CURVE_EVALUATIONS = 12
HORIZON = 4  # learning curves run this many time-to-target budgets
#: (task, micro-batch, accumulation) whose estimator cost is measured, per framework
OVERHEAD_CASES = [("digits-cnn", 16, 4), ("synthetic-images", 16, 4)]
BLOCK_SECONDS = 0.5  # CPU time per timed block of the estimator-cost measurement
FRAMEWORKS = ("torch", "tensorflow")
COLORS = {"pareto": "#1f77b4", "goodput": "#2ca02c", "time-to-target": "#d62728"}


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    if args.child:
        print(json.dumps(overhead_child(args.child, args.rounds)))
        return 0
    run = Run(args)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    n_trials = args.trials or (10 if args.quick else 20)
    repeats = 1 if args.quick else 3
    rounds = args.rounds or (10 if args.quick else 30)

    studies = run_studies(n_trials, seconds)
    curves = learning_curves(studies, seconds * HORIZON, repeats)
    fixed = fixed_sample_runs(studies)
    overhead = {}
    for framework in FRAMEWORKS:
        print(f"estimator cost on {framework}: {rounds} rounds per case ...", flush=True)
        overhead[framework] = run.child_json(__file__, framework, "--child", framework, "--rounds", str(rounds))
    plot(args.results, studies, curves, seconds)
    text = render(run, studies, curves, fixed, overhead, seconds, n_trials, repeats, rounds)
    write_markdown(args.results, "objectives", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default 20, 10 with --quick)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="time-to-target's training time per trial (default 4, 2 with --quick)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="estimator-cost rounds (default 30, 10 with --quick)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


# --- the three studies, and their recommendations trained again --------------------------------


def run_studies(n_trials: int, seconds: float) -> dict:
    from autobatch import TrialBudget, tune

    storage = f"journal:///{tempfile.mkdtemp(prefix='autobatch-objectives-')}/studies.log"
    studies = {}
    for objective in OBJECTIVES:
        budget = TrialBudget(train_seconds=seconds) if objective == "time-to-target" else TrialBudget(TRAIN_SAMPLES)
        print(f"study: {objective}, {n_trials} trials ...", flush=True)
        started = time.perf_counter()
        result = tune(
            TASK,
            BACKEND,
            memory_budget=MEMORY_BUDGET,
            n_trials=n_trials,
            storage=storage,
            study_name=objective,
            device="cpu",
            objective=objective,
            trial_budget=budget,
            max_trial_samples=TRAIN_SAMPLES,  # every trial trains the same samples, as this study of objectives has
            seed=0,
        )
        if result.recommended is None:
            raise SystemExit(f"the {objective} study found no feasible config")
        studies[objective] = {
            "recommended": result.recommended,
            "seconds": time.perf_counter() - started,
            "n_trials": result.n_trials,
            "n_pruned": result.n_pruned_trials,
            "noise_scale": result.noise_scale,
        }
    return studies


def _config(recommended: dict):
    from autobatch import TrialConfig

    return TrialConfig(recommended["micro_batch_size"], recommended["accumulation_steps"], recommended["learning_rate"])


def learning_curves(studies: dict, horizon: float, repeats: int) -> dict:
    """objective -> [(training seconds, median validation loss)] of its recommendation, ``horizon`` long."""
    from autobatch import TrialBudget
    from autobatch.process.worker import TrialWorker

    budget = TrialBudget(train_seconds=horizon, evaluations=CURVE_EVALUATIONS)
    runs: dict[str, list] = {objective: [] for objective in studies}
    with TrialWorker(TASK, BACKEND, memory_budget=MEMORY_BUDGET, device="cpu") as worker:
        for round_ in range(repeats):
            order = list(studies) if round_ % 2 == 0 else list(reversed(studies))
            for objective in order:
                print(f"learning curve: {objective}, {horizon:.0f} s, repeat {round_ + 1}/{repeats} ...", flush=True)
                result = worker.run(_config(studies[objective]["recommended"]), budget)
                if result.status != "ok":
                    raise SystemExit(f"{objective}'s recommendation failed: {result.status} {result.error}")
                runs[objective].append(result.intermediate_losses)
    return {
        objective: [
            (median(run[k]["train_seconds"] for run in curves), median(run[k]["val_loss"] for run in curves))
            for k in range(CURVE_EVALUATIONS)
        ]
        for objective, curves in runs.items()
    }


def fixed_sample_runs(studies: dict) -> dict:
    """objective -> its recommendation trained on the pareto studies' sample budget: (samples/s, val loss)."""
    from autobatch import TrialBudget
    from autobatch.process.worker import TrialWorker

    measured = {}
    with TrialWorker(TASK, BACKEND, memory_budget=MEMORY_BUDGET, device="cpu") as worker:
        for objective, study in studies.items():
            result = worker.run(_config(study["recommended"]), TrialBudget(TRAIN_SAMPLES))
            measured[objective] = (result.samples_per_second, result.val_loss)
    return measured


# --- the estimator's cost, inside one framework's process ----------------------------------------


def overhead_child(framework: str, rounds: int) -> list[dict]:
    """Per case: CPU seconds per window with the estimate on and off, in alternating blocks of windows.

    CPU time of this one-thread process, not wall time, and paired rounds (on and off
    back to back): other processes on the shared cores move both alike, and the spread
    of the paired ratios shows how far to trust the median.
    """
    import statistics

    from autobatch import load_workload

    rows = []
    for task, micro, accumulation in OVERHEAD_CASES:
        workload = load_workload(task)
        rng = np.random.default_rng(0)
        indices = [rng.choice(len(workload.y_train), micro, replace=False) for _ in range(accumulation)]
        batches = [(workload.x_train[i], workload.y_train[i]) for i in indices]
        make = torch_window if framework == "torch" else tensorflow_window
        step = {on: make(workload, batches, on) for on in (True, False)}
        for on in step:  # warm-up: tracing, allocator, caches
            for _ in range(3):
                step[on]()
        started = time.process_time()
        step[False]()
        block = max(3, round(BLOCK_SECONDS / max(time.process_time() - started, 1e-4)))
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(rounds):
            for on in (True, False) if round_ % 2 == 0 else (False, True):
                started = time.process_time()
                for _ in range(block):
                    step[on]()
                seconds[on].append((time.process_time() - started) / block)
        ratios = sorted(on / off for on, off in zip(seconds[True], seconds[False], strict=True))
        quartiles = statistics.quantiles(ratios, n=4)
        rows.append(
            {
                "task": task,
                "micro_batch": micro,
                "accumulation": accumulation,
                "block_windows": block,
                "on_ms": 1e3 * median(seconds[True]),
                "off_ms": 1e3 * median(seconds[False]),
                "ratio": median(ratios),
                "ratio_quartiles": [quartiles[0], quartiles[2]],
            }
        )
        print(
            f"  {task} {micro}x{accumulation}: on {rows[-1]['on_ms']:.2f} ms, off {rows[-1]['off_ms']:.2f} ms "
            f"per window, ratio {rows[-1]['ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def torch_window(workload, batches, measure: bool):
    """One window of the trial loop's ``train_window``, with or without the noise meter."""
    import torch

    from autobatch.backends.torch import GradientNoiseMeter, supervised_loss, train_window
    from autobatch.backends.torch.training import make_loss, make_optimizer

    torch.manual_seed(0)
    model = workload.build_model("torch")
    optimizer = make_optimizer(workload.optimizer, model.parameters(), workload.base_learning_rate)
    loss_fn = supervised_loss(make_loss(workload.loss))
    micro_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    meter = GradientNoiseMeter(model.parameters()) if measure else None

    def run() -> None:
        train_window(model, optimizer, loss_fn, micro_batches, noise_meter=meter)  # norms are read at a trial's end

    return run


def tensorflow_window(workload, batches, measure: bool):
    """One window of ``MicroBatchTrainer``, with the estimate traced in or not, read per window as a trial does."""
    import keras

    from autobatch.backends.tensorflow import MicroBatchTrainer, batch_spec
    from autobatch.backends.tensorflow.training import make_optimizer

    keras.utils.set_random_seed(0)
    trainer = MicroBatchTrainer(
        workload.build_model("tensorflow"),
        make_optimizer(workload.optimizer, workload.base_learning_rate),
        workload.loss,
        x_spec=batch_spec(workload.x_train),
        y_spec=batch_spec(workload.y_train),
        measure_noise=measure,
    )

    def run() -> None:
        trainer.train_window(batches)
        if measure:
            trainer.last_noise_norms()

    return run


# --- output ---------------------------------------------------------------------------------------


def plot(results: Path, studies: dict, curves: dict, seconds: float) -> None:
    from autobatch.core.noise import statistical_efficiency

    figure, (left, right) = new_figure(columns=2, width=11.0, height=4.4)
    for objective, curve in curves.items():
        rec = studies[objective]["recommended"]
        label = f"{objective}: {rec['micro_batch_size']}×{rec['accumulation_steps']}, lr {rec['learning_rate']:.2g}"
        left.plot(
            [t for t, _ in curve],
            [loss for _, loss in curve],
            marker="o",
            markersize=3,
            color=COLORS[objective],
            label=label,
        )
    left.axvline(seconds, color="black", linestyle=":", linewidth=1)
    left.annotate(
        "time-to-target's\nbudget per trial",
        (seconds, left.get_ylim()[1]),
        xytext=(4, -4),
        textcoords="offset points",
        va="top",
        fontsize=8,
    )
    left.set_yscale("log")
    left.set_xlabel("training time of the recommended config (s)")
    left.set_ylabel("validation loss")
    left.set_title(f"{TASK}: each objective's recommendation, trained longer", fontsize=10)
    left.legend(fontsize=8)

    from autobatch import load_workload

    noise = (studies["goodput"].get("noise_scale") or {}).get("probe")
    base = load_workload(TASK).base_batch_size
    batches = [2**k for k in range(0, 13)]
    if noise is not None:
        right.plot(
            batches,
            [statistical_efficiency(noise, b, base) for b in batches],
            color="black",
            linewidth=1,
            label=f"efficiency against B_0 = {base}, B_noise ≈ {noise:.0f} (noise probe)",
        )
        right.axvline(noise, color="gray", linestyle=":", linewidth=1)
        right.axhline(1.0, color="gray", linestyle="-", linewidth=0.5)
        for objective, study in studies.items():
            batch = study["recommended"]["effective_batch_size"]
            right.scatter(
                [batch],
                [statistical_efficiency(noise, batch, base)],
                color=COLORS[objective],
                zorder=3,
                label=f"{objective}: effective batch {batch}",
            )
    right.set_xscale("log", base=2)
    right.set_xlabel("effective batch B")
    right.set_ylabel("statistical efficiency (B_noise + B_0)/(B_noise + B)")
    right.set_title("past the noise scale, samples buy less progress", fontsize=10)
    right.legend(fontsize=8)
    save_plot(figure, results, "objectives")


def render(run: Run, studies, curves, fixed, overhead, seconds, n_trials, repeats, rounds) -> str:
    at_budget = CURVE_EVALUATIONS // HORIZON - 1  # the evaluation at T
    rows = []
    for objective, study in studies.items():
        rec = study["recommended"]
        speed, loss_fixed = fixed[objective]
        curve = curves[objective]
        rows.append(
            [
                objective,
                f"{rec['micro_batch_size']}×{rec['accumulation_steps']} = {rec['effective_batch_size']}",
                f"{rec['learning_rate']:.3g}",
                speed,
                loss_fixed,
                curve[at_budget][1],
                curve[-1][1],
                f"{study['seconds']:.0f} s",
                f"{study['n_trials']} ({study['n_pruned']} pruned)",
            ]
        )
    noise = studies["pareto"].get("noise_scale") or {}
    cost_rows = []
    for framework, cases in overhead.items():
        for case in cases:
            low, high = case["ratio_quartiles"]
            cost_rows.append(
                [
                    framework,
                    f"{case['task']} {case['micro_batch']}×{case['accumulation']}",
                    f"{case['off_ms']:.2f}",
                    f"{case['on_ms']:.2f}",
                    f"{(case['ratio'] - 1) * 100:+.1f}% ({(low - 1) * 100:+.1f}% … {(high - 1) * 100:+.1f}%)",
                ]
            )
    lines = [
        "# Which objective: pareto, goodput or time-to-target",
        "",
        run.header,
        "",
        f"Task `{TASK}` on {BACKEND} (CPU), memory budget {MEMORY_BUDGET}, {n_trials} trials per study, seed 0. "
        f"pareto and goodput train {TRAIN_SAMPLES} samples per trial; time-to-target trains {seconds:g} s per trial "
        f"(successive halving on the losses at {seconds / 4:g}, {seconds / 2:g} and {3 * seconds / 4:g} s). "
        f"Each recommendation is then trained for {HORIZON * seconds:g} s ({repeats} repeat(s), median) and on "
        f"{TRAIN_SAMPLES} samples.",
        "",
        markdown_table(
            [
                "objective",
                "micro × accumulation = batch",
                "lr",
                "samples/s",
                f"loss after {TRAIN_SAMPLES} samples",
                f"loss at {seconds:g} s",
                f"loss at {HORIZON * seconds:g} s",
                "study wall time",
                "trials",
            ],
            rows,
            align="llrrrrrrr",
        ),
        "",
        "Critical batch size pooled over the pareto study's accumulating trials: "
        + (f"B_simple ≈ {noise['b_simple']:.0f}" if noise.get("b_simple") is not None else "not measured")
        + (
            f" (per-trial range {noise['per_trial_range'][0]:.0f}–{noise['per_trial_range'][1]:.0f})"
            if noise.get("per_trial_range")
            else ""
        )
        + ".",
        "",
        "![learning curves and statistical efficiency](objectives.png)",
        "",
        "## What the noise-scale estimate costs",
        "",
        f"CPU time per window of the trial loop's step at accumulation 4, one thread, estimate on and off in "
        f"alternating blocks of about {BLOCK_SECONDS:g} s, {rounds} paired rounds after a warm-up; overhead = median "
        "of the paired on/off ratios − 1, with its interquartile range (other processes on the shared cores move "
        "single blocks by more than the estimate costs). Data loading and evaluation are left out, so a whole "
        "trial pays less. The estimate costs one norm per parameter tensor and micro-batch (PyTorch: a gradient "
        "hook; TensorFlow: in the traced step) and one per parameter tensor and window, so it weighs most on tiny "
        "models such as digits-cnn, whose micro-batch of 16 takes about a millisecond.",
        "",
        markdown_table(["framework", "case", "ms/window, estimate off", "ms/window, on", "overhead (IQR)"], cost_rows),
        "",
        run.footer(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
