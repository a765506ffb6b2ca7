"""The horizon objective against the truth: an exhaustive grid trained to the horizon, side by side with tune().

    .venv/bin/python benchmarks/horizon.py [--quick] [--tasks ...] [--frameworks ...] [--threads 1]

For each task and framework, in one run, one after the other:

1. The truth. A grid of micro-batch × accumulation × learning rate (three rates around the
   square-root rule, lr = base_lr · sqrt(B_eff / B_base), × 1/3, 1, 3), every config trained
   to the horizon exactly as the search's full-length trial trains it: in a forked worker
   process (:class:`~autobatch.process.worker.TrialWorker`) under the same memory budget,
   ``TrialBudget(train_samples=H)`` with H the horizon's samples (at least one effective
   batch). Its wall time is the whole grid loop's, the worker's start and framework import
   included.
2. ``tune()`` with the same horizon, memory budget and number of trials for each objective:
   the default (``horizon``), ``pareto``, ``goodput`` and ``time-to-target`` (each trial
   trains T = the horizon's samples ÷ the grid's median samples/s, so about as long as one
   grid config). Its wall time is the whole call's, the probe, storage and workers included.
3. Each pick trained to the horizon by the grid's procedure (the grid's value where the pick
   is a grid config), its loss there against the grid's best, and its rank among the grid.

CPU seconds (this process and its waited-for children) are given beside wall seconds: the
machine is shared, and CPU time moves less with what others run on it.

Targets for the default objective (issue 15): loss at the horizon <= 1.03 × the grid's best,
at <= 40 % of the grid's wall time.

Writes ``results/horizon.md`` and ``results/horizon.png``.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Run,
    Stopwatch,
    markdown_table,
    median,
    own_cpu_seconds,
    parse_args,
    read_json,
    save_plot,
    write_json,
    write_markdown,
)

MEMORY_BUDGET = "1GiB"
FRAMEWORKS = ("torch", "tensorflow")
#: the run each task's search is for: long enough that the batch and rate matter, a grid config seconds long
HORIZONS = {"digits-cnn": "20ep", "synthetic-images": "1ep"}
MICRO_BATCHES = (8, 32, 128, 512)
ACCUMULATIONS = (1, 4)
LR_FACTORS = (1 / 3, 1.0, 3.0)
N_TRIALS = 20
QUICK = {
    "tasks": ("digits-cnn",),
    "frameworks": ("torch",),
    "horizons": {"digits-cnn": "5ep", "synthetic-images": "0.5ep"},
    "micro_batches": (8, 64, 512),
    "accumulations": (1, 4),
    "n_trials": 8,
}
OBJECTIVES = ("horizon", "pareto", "goodput", "time-to-target")
TARGET_LOSS_RATIO = 1.03
TARGET_WALL_RATIO = 0.40
COLORS = {"horizon": "#d62728", "pareto": "#1f77b4", "goodput": "#2ca02c", "time-to-target": "#9467bd"}
PICK_MARKERS = {"horizon": "*", "pareto": "D", "goodput": "P", "time-to-target": "X"}
ACCUMULATION_COLORS = ("#7f7f7f", "#ff7f0e", "#17becf")
LR_MARKERS = {1 / 3: "v", 1.0: "o", 3.0: "^"}


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    run = Run(args)
    quick = QUICK if args.quick else {}
    tasks = args.tasks or quick.get("tasks", tuple(HORIZONS))
    frameworks = args.frameworks or quick.get("frameworks", FRAMEWORKS)
    horizons = quick.get("horizons", HORIZONS)
    grid_axes = (
        quick.get("micro_batches", MICRO_BATCHES),
        quick.get("accumulations", ACCUMULATIONS),
        LR_FACTORS,
    )
    n_trials = args.trials or quick.get("n_trials", N_TRIALS)
    saved = args.results / "horizon.json"
    settings = {"grid": [list(axis) for axis in grid_axes], "n_trials": n_trials, "memory_budget": MEMORY_BUDGET}
    earlier = read_json(saved) if args.reuse else {}
    reusable = {
        (c["task"], c["framework"], c["horizon_text"]): c
        for c in (earlier.get("cases", []) if earlier.get("settings") == settings else [])
    }
    cases = []
    for task in tasks:
        for framework in frameworks:
            key = (task, framework, horizons[task])
            if key in reusable:
                print(f"== {task} on {framework}: reused from {saved}", file=sys.stderr, flush=True)
                cases.append({**reusable[key], "reused": True})
            else:
                print(f"== {task} on {framework}, horizon {horizons[task]}", file=sys.stderr, flush=True)
                cases.append(run_case(task, framework, horizons[task], grid_axes, n_trials))
            # written after every case, so a run stopped part-way leaves what it measured
            write_json(saved, {"settings": settings, "cases": cases})
            plot(args.results, cases)
            write_markdown(args.results, "horizon", render(run, cases, grid_axes, n_trials))
    return 0


def _options(parser) -> None:
    parser.add_argument("--tasks", nargs="+", choices=tuple(HORIZONS), default=None, help="default: both")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=None, help="default: both")
    parser.add_argument("--trials", type=int, default=None, help=f"trials per study (default {N_TRIALS})")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take the cases (task, framework) already in RESULTS/horizon.json from a run with the same settings; "
        "measure the rest (each case's grid and studies are measured side by side in one run either way)",
    )


# --- one task on one framework: the grid, the four studies, the picks trained to the horizon ----------


class Clock:
    """Wall and CPU seconds of what runs inside the ``with`` block, its waited-for children included."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), own_cpu_seconds()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, own_cpu_seconds() - self.cpu


def run_case(task: str, framework: str, horizon_text: str, grid_axes, n_trials: int) -> dict:
    from autobatch.core.memory import MemoryBudget
    from autobatch.search.horizon import Horizon
    from autobatch.tasks.loading import load_task

    workload = load_task(task)
    horizon = Horizon.parse(horizon_text)
    budget_bytes = MemoryBudget.parse(MEMORY_BUDGET).resolve("cpu")
    stopwatch = Stopwatch()
    case = {
        "task": task,
        "framework": framework,
        "started": f"{datetime.now():%Y-%m-%d %H:%M}",
        "horizon_text": horizon_text,
        "horizon": str(horizon),
        "horizon_samples": horizon.samples(workload.n_train, workload.base_batch_size),
        "n_train": workload.n_train,
        "base_batch": workload.base_batch_size,
        "base_lr": workload.base_learning_rate,
    }
    micro_batches, accumulations, factors = grid_axes
    configs = [
        (micro, accumulation, factor, sqrt_rule_lr(workload, micro * accumulation) * factor)
        for micro in micro_batches
        for accumulation in accumulations
        for factor in factors
    ]
    with Clock() as clock, Trainer(task, framework, budget_bytes, horizon, workload.n_train) as trainer:
        grid = []
        for micro, accumulation, factor, lr in configs:
            grid.append({**trainer.train(micro, accumulation, lr), "lr_factor": factor})
            _log(f"grid {micro}×{accumulation} lr {lr:.3g}: {_loss_text(grid[-1])}, {grid[-1]['wall']:.1f} s")
    case["grid"] = grid
    case["grid_wall"], case["grid_cpu"] = clock.wall, clock.cpu
    ran = [g for g in grid if g["loss"] is not None]
    if not ran:
        raise SystemExit(f"{task} on {framework}: no grid config trained to the horizon")
    best = min(ran, key=lambda g: g["loss"])
    case["grid_best"] = best
    # time-to-target trains each trial for the time a grid config takes to train the horizon at the median speed
    case["ttt_seconds"] = round(case["horizon_samples"] / median(g["samples_per_second"] for g in ran), 2)
    studies = {}
    for objective in OBJECTIVES:
        studies[objective] = run_study(task, framework, horizon_text, objective, n_trials, case["ttt_seconds"])
    with Trainer(task, framework, budget_bytes, horizon, workload.n_train) as trainer:
        for objective, study in studies.items():
            if "error" in study:
                continue
            study["truth"] = pick_truth(study["pick"], grid, trainer)
            loss = study["truth"]["loss"]
            study["loss_ratio"] = None if loss is None else loss / best["loss"]
            study["rank"] = None if loss is None else 1 + sum(g["loss"] < loss for g in ran)
            study["wall_ratio"] = study["wall"] / case["grid_wall"]
            study["cpu_ratio"] = study["cpu"] / case["grid_cpu"]
            _log(
                f"{objective}: pick {study['pick']['micro']}×{study['pick']['accumulation']} "
                f"lr {study['pick']['lr']:.3g}, {_loss_text(study['truth'])} (÷ best {_ratio(study['loss_ratio'])}), "
                f"wall ÷ grid {study['wall_ratio']:.2f}"
            )
    case["studies"] = studies
    case["seconds"] = stopwatch.seconds
    case["others_busy"] = stopwatch.others_busy_share()
    return case


def sqrt_rule_lr(workload, effective_batch: int) -> float:
    return workload.base_learning_rate * math.sqrt(effective_batch / workload.base_batch_size)


class Trainer:
    """Trains a config to the horizon the way the search's full-length trial does: one worker, forked trials."""

    def __init__(self, task: str, framework: str, budget_bytes: int, horizon, n_train: int) -> None:
        from autobatch.process.worker import TrialWorker

        self.horizon, self.n_train = horizon, n_train
        self.worker = TrialWorker(task, framework, memory_budget=budget_bytes, device="cpu")

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.worker.close()

    def train(self, micro: int, accumulation: int, lr: float) -> dict:
        from autobatch.core.config import TrialBudget, TrialConfig

        effective = micro * accumulation
        samples = max(effective, math.ceil(self.horizon.samples(self.n_train, effective)))
        started = time.perf_counter()
        result = self.worker.run(TrialConfig(micro, accumulation, lr), TrialBudget(train_samples=samples))
        ok = result.status == "ok" and result.val_loss is not None and math.isfinite(result.val_loss)
        return {
            "micro": micro,
            "accumulation": accumulation,
            "lr": lr,
            "status": result.status,
            "loss": result.val_loss if ok else None,
            "samples": samples,
            "samples_per_second": result.samples_per_second if ok else None,
            "wall": time.perf_counter() - started,
        }


def run_study(task: str, framework: str, horizon: str, objective: str, n_trials: int, ttt_seconds: float) -> dict:
    from autobatch import tune
    from autobatch.core.config import TrialBudget

    budget = TrialBudget(train_seconds=ttt_seconds) if objective == "time-to-target" else None
    clock = Clock()
    try:
        with tempfile.TemporaryDirectory(prefix="autobatch-horizon-") as folder, clock:
            result = tune(
                task,
                framework,
                horizon=horizon,
                memory_budget=MEMORY_BUDGET,
                n_trials=n_trials,
                storage=f"sqlite:///{folder}/study.db",
                study_name=objective,
                objective=None if objective == "horizon" else objective,
                trial_budget=budget,
                seed=0,
                device="cpu",
            )
            spent = trials_spent(result.study)
    except Exception as error:  # a study that fails is a result too: the table says so, the other cases go on
        reason = f"{type(error).__name__}: {error}"
        _log(f"study {objective} FAILED after {clock.wall:.0f} s: {reason}")
        return {"error": reason, "wall": clock.wall, "cpu": clock.cpu}
    rec = result.recommended
    if rec is None:
        _log(f"study {objective} recommended nothing")
        return {"error": "recommended nothing", "wall": clock.wall, "cpu": clock.cpu}
    _log(f"study {objective}: {clock.wall:.0f} s, {result.n_trials} trials ({result.n_pruned_trials} pruned)")
    return {
        "pick": {
            "micro": rec["micro_batch_size"],
            "accumulation": rec["accumulation_steps"],
            "lr": rec["learning_rate"],
        },
        "claimed_loss": rec.get("loss_at_horizon"),
        "claimed_kind": rec.get("loss_at_horizon_kind"),
        "claimed_share": rec.get("horizon_share"),
        "wall": clock.wall,
        "cpu": clock.cpu,
        "probe_seconds": (result.probe or {}).get("seconds"),
        "max_effective_batch": (result.horizon or {}).get("max_effective_batch"),
        "max_micro_batch": result.max_micro_batch,
        "n_trials": result.n_trials,
        "n_pruned": result.n_pruned_trials,
        "horizon_summary": result.horizon,
        **spent,
    }


def trials_spent(study) -> dict:
    """Where a study's time went: its trials' wall seconds, how much of the horizon they trained together,
    and its dearest trial at the full horizon (config, wall seconds, samples/s)."""
    shares = [t.user_attrs.get("horizon_share") for t in study.trials]
    shares = [share for share in shares if share is not None]
    full = [t.user_attrs for t in study.trials if (t.user_attrs.get("horizon_share") or 0.0) >= 0.999]
    dearest = max(full, key=lambda attrs: (attrs.get("timings") or {}).get("wall", 0.0), default=None)
    return {
        "trial_wall": sum((t.user_attrs.get("timings") or {}).get("wall", 0.0) for t in study.trials),
        "horizons_trained": sum(shares) if shares else None,
        "full_horizon_trials": sum(share >= 0.999 for share in shares) if shares else None,
        "dearest_full_trial": None
        if dearest is None
        else (
            f"{dearest['micro_batch_size']}×{dearest['accumulation_steps']}: "
            f"{(dearest.get('timings') or {}).get('wall', 0.0):.1f} s at {dearest.get('samples_per_second') or 0:,.0f}/s"
        ),
    }


def pick_truth(pick: dict, grid: list, trainer: Trainer) -> dict:
    for g in grid:
        same_lr = math.isclose(g["lr"], pick["lr"], rel_tol=1e-9)
        if (g["micro"], g["accumulation"]) == (pick["micro"], pick["accumulation"]) and same_lr:
            return {**g, "from_grid": True}
    return {**trainer.train(pick["micro"], pick["accumulation"], pick["lr"]), "from_grid": False}


def _log(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def _loss_text(row: dict) -> str:
    return f"loss {row['loss']:.4g}" if row["loss"] is not None else row["status"]


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


# --- output ------------------------------------------------------------------------------------


def plot(results: Path, cases: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    columns = min(2, len(cases))
    rows = math.ceil(len(cases) / columns)
    figure, grid_of_axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 4.6 * rows), squeeze=False)
    axes = [ax for row in grid_of_axes for ax in row]
    for ax in axes[len(cases) :]:
        ax.set_visible(False)
    for ax, case in zip(axes, cases, strict=False):
        ran = [g for g in case["grid"] if g["loss"] is not None]
        for accumulation, color in zip(sorted({g["accumulation"] for g in ran}), ACCUMULATION_COLORS, strict=False):
            for factor, marker in LR_MARKERS.items():
                points = [g for g in ran if g["accumulation"] == accumulation and g["lr_factor"] == factor]
                ax.scatter(
                    [g["samples_per_second"] for g in points],
                    [g["loss"] for g in points],
                    marker=marker,
                    s=28,
                    color=color,
                    alpha=0.8,
                    label=f"grid, accumulation {accumulation}, lr × {_factor(factor)}",
                )
        best = case["grid_best"]
        ax.scatter(
            [best["samples_per_second"]],
            [best["loss"]],
            s=170,
            facecolors="none",
            edgecolors="black",
            linewidths=1.4,
            label="grid's best",
        )
        for objective, study in case["studies"].items():
            truth = study.get("truth")
            if truth is None or truth["loss"] is None:
                continue
            pick = study["pick"]
            ax.scatter(
                [truth["samples_per_second"]],
                [truth["loss"]],
                marker=PICK_MARKERS[objective],
                s=110 if objective == "horizon" else 60,
                color=COLORS[objective],
                edgecolors="black",
                linewidths=0.5,
                zorder=3,
                label=f"{objective}: {pick['micro']}×{pick['accumulation']}, lr {pick['lr']:.2g}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("samples/s (trained to the horizon)")
        ax.set_ylabel(f"validation loss after {case['horizon']}")
        ax.set_title(f"{case['task']} on {case['framework']}, horizon {case['horizon']}", fontsize=10)
        ax.legend(fontsize=6, loc="best")
    save_plot(figure, results, "horizon")


def _factor(factor: float) -> str:
    return "1/3" if math.isclose(factor, 1 / 3) else f"{factor:g}"


def pick_row(where: str, name: str, objective: str, study: dict, n_ok: int) -> list:
    pick, truth = study["pick"], study["truth"]
    claimed = "–" if study["claimed_loss"] is None else f"{study['claimed_loss']:.4g} ({study['claimed_kind']})"
    met = "–"
    if objective == "horizon":
        loss_ok = study["loss_ratio"] is not None and study["loss_ratio"] <= TARGET_LOSS_RATIO
        wall_ok = study["wall_ratio"] <= TARGET_WALL_RATIO
        met = f"loss {'yes' if loss_ok else 'NO'}, wall {'yes' if wall_ok else 'NO'}"
    return [
        where,
        name,
        f"{pick['micro']}×{pick['accumulation']}, lr {pick['lr']:.3g}" + (" (in grid)" if truth["from_grid"] else ""),
        truth["loss"] if truth["loss"] is not None else truth["status"],
        claimed,
        _ratio(study["loss_ratio"]),
        "–" if study["rank"] is None else f"{study['rank']} of {n_ok}",
        f"{study['wall']:.0f} ({study['probe_seconds'] or 0:.0f})",
        f"{study['wall_ratio']:.2f}",
        f"{study['cpu_ratio']:.2f}",
        f"{study['n_trials']} ({study['n_pruned']})",
        met,
    ]


def render(run: Run, cases: list, grid_axes, n_trials: int) -> str:
    micro_batches, accumulations, factors = grid_axes
    rows, grid_rows, spent_rows, detail = [], [], [], []
    for case in cases:
        where = f"{case['task']} / {case['framework']}"
        best = case["grid_best"]
        n_ok = sum(g["loss"] is not None for g in case["grid"])
        grid_rows.append(
            [
                where,
                f"{case['horizon']} ({case['horizon_samples']:,.0f} samples)",
                f"{n_ok} of {len(case['grid'])}",
                f"{best['micro']}×{best['accumulation']}, lr {best['lr']:.3g}",
                best["loss"],
                case["grid_wall"],
                case["grid_cpu"],
                case["ttt_seconds"],
                f"{case['started']}, others {case['others_busy']:.0%}" + (" (reused)" if case.get("reused") else ""),
            ]
        )
        for objective, study in case["studies"].items():
            name = objective + (" (default)" if objective == "horizon" else "")
            if "error" in study:
                failed = f"failed after {study['wall']:.0f} s: {study['error'][:160]}"
                rows.append([where, name, failed, *["–"] * 8, "NO (failed)" if objective == "horizon" else "–"])
                continue
            rows.append(pick_row(where, name, objective, study, n_ok))
            spent_rows.append(
                [
                    where,
                    objective,
                    study["n_trials"],
                    study["n_pruned"],
                    study["full_horizon_trials"],
                    study["horizons_trained"],
                    study.get("dearest_full_trial"),
                    study["trial_wall"],
                    study.get("max_effective_batch"),
                    study["probe_seconds"],
                    study["wall"],
                    case["grid_wall"],
                ]
            )
        detail.append(f"**{where}**, horizon {case['horizon']}:\n")
        detail.append(
            markdown_table(
                ["micro × accumulation", "lr (× sqrt rule)", "loss at horizon", "samples/s", "wall s"],
                [
                    [
                        f"{g['micro']}×{g['accumulation']}",
                        f"{g['lr']:.3g} (× {_factor(g['lr_factor'])})",
                        g["loss"] if g["loss"] is not None else g["status"],
                        g["samples_per_second"],
                        g["wall"],
                    ]
                    for g in case["grid"]
                ],
                align="lrrrr",
            )
        )
        detail.append("")
    tasks_line = ", ".join(f"`{c['task']}` {c['horizon']}" for c in cases if c["framework"] == cases[0]["framework"])
    lines = [
        "# The horizon objective against a grid trained to the horizon",
        "",
        run.header,
        "",
        f"Horizons: {tasks_line}. Memory budget {MEMORY_BUDGET} (CPU) for the grid and every study. Grid: micro-batch "
        f"{', '.join(map(str, micro_batches))} × accumulation {', '.join(map(str, accumulations))} × learning rate "
        f"{', '.join(_factor(f) for f in factors)} × the square-root rule (base lr × sqrt(B_eff / base batch)); each "
        "config trained to the horizon in a forked worker (`TrialWorker`, `TrialBudget(train_samples=horizon)`), as "
        f"the search's full-length trials train. Studies: `tune(horizon=..., n_trials={n_trials}, seed=0)` with each "
        "objective; time-to-target's time per trial T = the horizon's samples ÷ the grid's median samples/s. Every "
        "pick is then trained to the horizon as the grid is (the grid's value where the pick is a grid config).",
        "",
        "Wall seconds: the whole grid loop (its worker's start included) and the whole `tune()` call (probe, "
        "storage, workers included), measured in this run one after the other; CPU seconds: this process and its "
        "children, over the same spans. The shared machine moves wall seconds more than CPU seconds.",
        "",
        "## The truth: the grid",
        "",
        markdown_table(
            [
                "task / framework",
                "horizon",
                "configs trained",
                "grid's best",
                "best loss",
                "wall s",
                "CPU s",
                "T s",
                "measured (others' share of the cores)",
            ],
            grid_rows,
            align="llrlrrrrl",
        ),
        "",
        "## Each objective's pick, trained to the horizon",
        "",
        f"Targets for the default: loss ≤ {TARGET_LOSS_RATIO}× the grid's best, wall ≤ {TARGET_WALL_RATIO:.0%} of "
        "the grid's. Rank: 1 + the grid configs with a lower loss than the pick's. The study's own estimate of the "
        "loss at the horizon is what its recommendation rested on.",
        "",
        markdown_table(
            [
                "task / framework",
                "objective",
                "pick (micro×accum, lr)",
                "loss at horizon",
                "study's estimate",
                "÷ grid best",
                "rank",
                "tune wall s (probe)",
                "÷ grid wall",
                "CPU ÷ grid",
                "trials (pruned)",
                "targets met",
            ],
            rows,
            align="lllrrrrrrrrl",
        ),
        "",
        "![loss at the horizon against throughput](horizon.png)",
        "",
        "## Where each study's time went",
        "",
        "Trials at the full horizon: trials that trained all of it; horizons trained: the shares of the horizon its "
        "trials trained, summed (the grid trains one per config); dearest at the full horizon: the config of the "
        "full-horizon trial with the most wall seconds, and its samples/s; trial wall: the trials' own wall seconds, "
        "summed (the rest of the study's wall is the probe, the storage and Optuna); largest effective batch: what "
        "the study searched up to, the horizon's samples in 16 optimizer steps (tune()'s default), and the probe "
        "did not look for the wall past it.",
        "",
        markdown_table(
            [
                "task / framework",
                "objective",
                "trials",
                "pruned",
                "trials at the full horizon",
                "horizons trained",
                "dearest at the full horizon",
                "trial wall s",
                "largest effective batch",
                "probe s",
                "study wall s",
                "grid wall s",
            ],
            spent_rows,
            align="llrrrrlrrrrr",
        ),
        "",
        "<details><summary>Every grid config</summary>",
        "",
        *detail,
        "</details>",
        "",
        run.footer(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
