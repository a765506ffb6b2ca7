"""autobatch against the alternatives: one workload, one memory budget, every method's pick measured alike.

    .venv/bin/python benchmarks/tuners.py [--quick] [--budget 768MiB] [--trials N] [--refresh-grid]

On ``synthetic-images`` (PyTorch, CPU, ``RLIMIT_DATA`` budget), each method searches
micro-batch × accumulation × learning rate, or as much of it as it knows about:

- Lightning ``Tuner.scale_batch_size`` (power; binsearch), then the linear LR scaling rule
  ``lr = base_lr × batch / base_batch``; accumulation 1.
- Accelerate ``find_executable_batch_size`` (from the training-set size down by ×0.9),
  the task's base learning rate; accumulation 1.
- Grid search with our trial runner over micro-batch × accumulation × LR offset around
  the square-root rule (the space autobatch searches).
- Optuna's ``RandomSampler`` with our trial runner, the same space with the micro-batch
  up to the training-set size (it has no probe), the same number of trials as autobatch.
- ``autobatch.tune`` (TPE, probe first).

Lightning and Accelerate run in a child process capped at the budget (see
``probe.py``): that child is the user's process, and the OOMs it catches are counted.
The grid is also the ground truth; it is cached in ``results/grid_cache.json`` (keyed by
workload, budget, trial budget, grid, threads, CPU and versions; ``results/quick/`` for
``--quick``), so a rerun skips it.
Then every method's final config is trained again by one trial worker, the configs
taking turns round by round, and its throughput and validation loss are those of that
pass. Writes ``results/tuners.md`` and ``results/tuners.png``.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Run,
    cache_folder,
    cpu_model,
    markdown_table,
    median,
    new_figure,
    parse_args,
    read_json,
    save_plot,
    versions,
    write_json,
    write_markdown,
)

TASK = "synthetic-images"
LOSS_TOLERANCE = 0.02
THROUGHPUT_TARGET = 0.95
WALL_TARGET = 0.30
GRID = {
    "quick": {"micro_batch": [1, 16, 128], "accumulation": [1, 4], "lr_offset": [0.0, 0.5]},
    "full": {
        "micro_batch": [1, 4, 16, 64, 256],
        "accumulation": [1, 2, 4, 8],
        "lr_offset": [-1.0, -0.5, 0.0, 0.5, 1.0],
    },
}


def trial_budget(quick: bool):
    from autobatch import TrialBudget

    # 1024 samples: enough for the loss to tell learning rates and batch sizes apart on this task.
    # --quick is a smoke test of every method (targets are not judged), so half of that.
    if quick:
        return TrialBudget(train_samples=512, warmup_steps=1, min_timed_steps=1, val_samples=256)
    return TrialBudget(train_samples=1024, warmup_steps=1, min_timed_steps=2)


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    run = Run(args, "lightning", "accelerate")
    mode = "quick" if args.quick else "full"
    trials = args.trials or (8 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)
    budget = trial_budget(args.quick)

    from autobatch import MemoryBudget, load_workload

    workload = load_workload(TASK)
    budget_bytes = MemoryBudget.parse(args.budget).resolve("cpu")

    grid = cached_grid(args, mode, budget, workload)
    methods: dict[str, dict] = {}
    for name in ("lightning-power", "lightning-binsearch", "accelerate"):
        print(f"{name} ...", flush=True)
        methods[name] = capped_tool(name, budget_bytes, workload)
        print(f"  {methods[name]['summary']}", flush=True)
    methods["grid"] = grid_method(grid)
    print(f"random search, {trials} trials ...", flush=True)
    methods["random"] = random_search(args.budget, budget, trials, workload)
    print(f"  {methods['random']['summary']}", flush=True)
    print(f"autobatch.tune, {trials} trials ...", flush=True)
    methods["autobatch"] = autobatch_tune(args.budget, budget, trials)
    print(f"  {methods['autobatch']['summary']}", flush=True)

    print(f"measuring every final config, {rounds} round(s), configs in turn ...", flush=True)
    measure_finals(methods, args.budget, budget, rounds)

    text = render(run, methods, grid, trials, rounds, budget)
    plot(args, methods, grid)
    write_markdown(args.results, "tuners", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--budget", default="768MiB", help="the memory budget (RLIMIT_DATA on the CPU)")
    parser.add_argument(
        "--trials", type=int, default=None, help="trials for autobatch and random (default 20, 8 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the final measurement (default 3, 1 with --quick)"
    )
    parser.add_argument("--refresh-grid", action="store_true", help="run the grid again even if it is cached")


# --- the methods ------------------------------------------------------------------------------


def _config(micro: int, accumulation: int, learning_rate: float):
    from autobatch import TrialConfig

    return TrialConfig(int(micro), int(accumulation), float(learning_rate))


def _sqrt_rule(workload, effective: int, offset: float) -> float:
    from autobatch.search.space import scaled_learning_rate

    return scaled_learning_rate(workload.base_learning_rate, workload.base_batch_size, effective, "sqrt", offset)


def cached_grid(args, mode: str, budget, workload) -> dict:
    """The exhaustive grid's results, from the cache when this exact grid was run here before."""
    cache_path = cache_folder(args) / "grid_cache.json"
    key = "|".join(
        [
            TASK,
            "torch",
            args.budget,
            f"train={budget.train_samples}",
            f"val={budget.val_samples}",
            f"threads={args.threads}",
            f"grid={GRID[mode]}",
            cpu_model(),
            versions("torch"),
        ]
    )
    cache = read_json(cache_path)
    if key in cache and not args.refresh_grid:
        print(
            f"grid: {len(cache[key]['trials'])} trials from {cache_path.name} (run {cache[key]['created']})", flush=True
        )
        return {**cache[key], "cached": True}
    from autobatch.process.worker import TrialWorker

    space = GRID[mode]
    points = list(itertools.product(space["micro_batch"], space["accumulation"], space["lr_offset"]))
    print(f"grid: {len(points)} trials ...", flush=True)
    trials = []
    started = time.perf_counter()
    with TrialWorker(TASK, "torch", memory_budget=args.budget, device="cpu") as worker:
        for micro, accumulation, offset in points:
            config = _config(micro, accumulation, _sqrt_rule(workload, micro * accumulation, offset))
            result = worker.run(config, budget)
            trials.append(_record(config, result, lr_offset=offset))
            print(
                f"  {micro:4d}×{accumulation} δ={offset:+.1f} {result.status:4s} "
                f"{result.samples_per_second or 0:6.0f}/s loss {result.val_loss or float('nan'):.4f}",
                flush=True,
            )
    entry = {
        "trials": trials,
        "wall_seconds": time.perf_counter() - started,
        "created": time.strftime("%Y-%m-%d %H:%M"),
    }
    cache[key] = entry
    write_json(cache_path, cache)
    return {**entry, "cached": False}


def _record(config, result, **extra) -> dict:
    return {
        "micro_batch": config.micro_batch_size,
        "accumulation": config.accumulation_steps,
        "learning_rate": config.learning_rate,
        "status": result.status,
        "samples_per_second": result.samples_per_second,
        "val_loss": result.val_loss,
        **extra,
    }


def pick(trials: list[dict]) -> dict | None:
    """autobatch's rule on plain records: the fastest whose loss is within 2% of the best loss."""
    ok = [t for t in trials if t["status"] == "ok" and t["val_loss"] is not None and t["val_loss"] == t["val_loss"]]
    if not ok:
        return None
    best_loss = min(t["val_loss"] for t in ok)
    allowed = best_loss + LOSS_TOLERANCE * abs(best_loss)
    return max((t for t in ok if t["val_loss"] <= allowed), key=lambda t: t["samples_per_second"] or 0.0)


def grid_method(grid: dict) -> dict:
    best = pick(grid["trials"])
    return {
        "config": _config(best["micro_batch"], best["accumulation"], best["learning_rate"]),
        "seconds": grid["wall_seconds"],
        "user_ooms": 0,
        "worker_ooms": sum(1 for t in grid["trials"] if t["status"] == "oom"),
        "work": f"{len(grid['trials'])} trials",
    }


def capped_tool(name: str, budget_bytes: int, workload) -> dict:
    from probe import run_capped_tool

    report = run_capped_tool(name, TASK, budget_bytes, len(workload.x_train))
    found = report.get("found")
    method = {
        "seconds": report.get("seconds", report.get("seconds_to_failure", report["process_seconds"])),
        "process_seconds": report["process_seconds"],
        "user_ooms": report.get("ooms", 0),
        "crashed_on_oom": report.get("crashed_on_oom", False),
        "worker_ooms": None,
        "work": f"{len(report.get('tried', []))} tries",
        "error": report.get("error"),
    }
    if found:
        rate = workload.base_learning_rate
        if name.startswith("lightning"):  # the linear scaling rule from the task's base batch
            rate = workload.base_learning_rate * found / workload.base_batch_size
        method["config"] = _config(found, 1, rate)
    method["summary"] = f"batch {found}, {method['user_ooms']} OOMs, {method['seconds']:.1f} s" + (
        f", failed: {report['error']}" if report.get("error") else ""
    )
    return method


def random_search(memory_budget: str, budget, trials: int, workload) -> dict:
    import optuna

    from autobatch.process.worker import TrialWorker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    records = []
    started = time.perf_counter()
    with TrialWorker(TASK, "torch", memory_budget=memory_budget, device="cpu") as worker:

        def objective(trial):
            micro = trial.suggest_int("micro_batch_size", 1, len(workload.x_train), log=True)
            accumulation = trial.suggest_int("accumulation_steps", 1, 8, log=True)
            offset = trial.suggest_float("lr_offset_decades", -1.0, 1.0)
            config = _config(micro, accumulation, _sqrt_rule(workload, micro * accumulation, offset))
            result = worker.run(config, budget)
            records.append(_record(config, result))
            if result.status != "ok" or result.val_loss is None:
                return 0.0, 1e3
            return result.samples_per_second or 0.0, result.val_loss

        study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(objective, n_trials=trials)
    best = pick(records)
    return {
        "config": _config(best["micro_batch"], best["accumulation"], best["learning_rate"]) if best else None,
        "seconds": time.perf_counter() - started,
        "user_ooms": 0,
        "worker_ooms": sum(1 for r in records if r["status"] == "oom"),
        "work": f"{trials} trials",
        "summary": f"{best and (best['micro_batch'], best['accumulation'])}, "
        f"{sum(1 for r in records if r['status'] == 'oom')} OOM trials",
    }


def autobatch_tune(memory_budget: str, budget, trials: int) -> dict:
    import autobatch

    with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as folder:
        started = time.perf_counter()
        result = autobatch.tune(
            TASK,
            "torch",
            memory_budget=memory_budget,
            n_trials=trials,
            storage=f"sqlite:///{folder}/tuners.db",
            study_name="tuners",
            trial_budget=budget,
            objective="pareto",  # the grid's truth is the loss after the same samples per trial
            max_trial_samples=budget.train_samples,
            device="cpu",
            seed=0,
        )
        seconds = time.perf_counter() - started
    rec = result.recommended
    probes = result.probe.get("probes", [])
    return {
        "config": _config(rec["micro_batch_size"], rec["accumulation_steps"], rec["learning_rate"]) if rec else None,
        "seconds": seconds,
        "user_ooms": 0,
        "worker_ooms": result.n_oom_trials + sum(1 for p in probes if p["status"] == "oom"),
        "work": f"{len(probes)} probes + {result.n_trials} trials",
        "wall": result.max_micro_batch,
        "summary": f"wall {result.max_micro_batch}, recommended {rec and (rec['micro_batch_size'], rec['accumulation_steps'], round(rec['learning_rate'], 5))}, {seconds:.0f} s",
    }


def measure_finals(methods: dict, memory_budget: str, budget, rounds: int) -> None:
    """Every distinct final config, trained again by one worker, the configs taking turns."""
    from autobatch.process.worker import TrialWorker

    configs = []
    for method in methods.values():
        if method.get("config") is not None and method["config"] not in configs:
            configs.append(method["config"])
    measured: dict = {config: [] for config in configs}
    with TrialWorker(TASK, "torch", memory_budget=memory_budget, device="cpu") as worker:
        for round_number in range(rounds):
            shift = round_number % len(configs)
            for config in configs[shift:] + configs[:shift]:
                measured[config].append(worker.run(config, budget))
    for method in methods.values():
        results = measured.get(method.get("config"), [])
        method["statuses"] = [r.status for r in results]
        ok = [r for r in results if r.status == "ok"]
        method["throughput"] = median(r.samples_per_second for r in ok) if ok else None
        method["val_loss"] = median(r.val_loss for r in ok if r.val_loss is not None) if ok else None


# --- table and plot ---------------------------------------------------------------------------


LABELS = {
    "lightning-power": "Lightning power + linear LR rule",
    "lightning-binsearch": "Lightning binsearch + linear LR rule",
    "accelerate": "Accelerate find_executable_batch_size",
    "grid": "grid search (our trial runner)",
    "random": "Optuna random sampler (our trial runner)",
    "autobatch": "autobatch.tune",
}


def render(run: Run, methods, grid, trials, rounds, budget) -> str:
    args = run.args
    grid_seconds = methods["grid"]["seconds"]
    reference = methods["grid"]
    rows = []
    for name, method in methods.items():
        config = method.get("config")
        rows.append(
            [
                LABELS[name],
                f"{method['seconds']:.0f}",
                f"{method['seconds'] / grid_seconds:.2f}",
                method["work"],
                f"{method['user_ooms']} (crashed)" if method.get("crashed_on_oom") else method["user_ooms"],
                "–" if method.get("worker_ooms") is None else method["worker_ooms"],
                f"{config.micro_batch_size} × {config.accumulation_steps}, lr {config.learning_rate:.2g}"
                if config
                else f"failed: {method.get('error')}",
                method.get("throughput"),
                f"{method['val_loss']:.4f}" if method.get("val_loss") is not None else "–",
                _relative(method.get("throughput"), reference.get("throughput")),
                _relative(method.get("val_loss"), reference.get("val_loss")),
            ]
        )
    table = markdown_table(
        [
            "method",
            "wall (s)",
            "/ grid wall",
            "work",
            "OOMs in user's process",
            "OOMs in workers",
            "final config",
            "samples/s",
            "val loss",
            "samples/s / grid pick",
            "val loss / grid pick",
        ],
        rows,
        align="lrrrrrlrrrr",
    )
    ours = methods["autobatch"]
    grid_best_loss = min(t["val_loss"] for t in grid["trials"] if t["status"] == "ok" and t["val_loss"] is not None)
    speed = (ours.get("throughput") or 0) / (reference.get("throughput") or float("inf"))
    loss_ok = ours.get("val_loss") is not None and ours["val_loss"] <= grid_best_loss * (1 + LOSS_TOLERANCE)
    share = ours["seconds"] / grid_seconds
    judged = not args.quick

    def verdict(met: bool) -> str:
        if not judged:
            return "not judged (--quick)"
        return "**met**" if met else "**not met**"

    targets = [
        f"- autobatch's pick within 5% of the grid's best throughput among configs within 2% of the best loss: "
        f"{speed:.2f}× the grid pick's samples/s (measured side by side), val loss {ours.get('val_loss') or float('nan'):.4f} "
        f"vs the grid's best {grid_best_loss:.4f} ({'within' if loss_ok else 'not within'} 2%) — "
        f"{verdict(speed >= THROUGHPUT_TARGET and loss_ok)}",
        f"- at ≤ 30% of the grid's wall time: {ours['seconds']:.0f} s vs {grid_seconds:.0f} s = {share:.2f} — "
        f"{verdict(share <= WALL_TARGET)}",
        f"- zero OOMs in the user's process: {'**met**' if ours['user_ooms'] == 0 else '**not met**'} (probes and "
        "trials run in workers; "
        f"{ours['worker_ooms']} OOM(s) there)",
    ]
    if args.quick:
        targets.append(
            f"- --quick is a smoke test: its grid has {len(grid['trials'])} points and autobatch {trials} trials, so "
            "neither the best config nor the grid's cost is that of the search space autobatch covers; the first two "
            "targets are judged on the full run."
        )
    grid_space = GRID["quick" if args.quick else "full"]
    return "\n".join(
        [
            f"# Tuners: {TASK} (PyTorch, CPU), budget {args.budget}",
            "",
            run.header,
            "",
            table,
            "",
            "Targets:",
            "",
            *targets,
            "",
            "Notes:",
            "",
            f"- Every trial trains {budget.train_samples} samples and evaluates on "
            f"{budget.val_samples or 'all'} validation samples; samples/s and val loss of the final configs come from "
            f"{rounds} more run(s) of each by one trial worker, the configs taking turns (median), so every method is "
            "measured the same way at the same time. Ratios are against the grid's pick measured in that same pass.",
            f"- Grid: micro-batch {grid_space['micro_batch']} × accumulation {grid_space['accumulation']} × LR offset "
            f"{grid_space['lr_offset']} decades around the square-root rule (the space autobatch searches); "
            f"{len(grid['trials'])} trials, {'cached from ' + grid['created'] if grid['cached'] else 'run now'}. "
            f"Its wall time is the run's, start-up included.",
            f"- autobatch and random search: {trials} trials each; autobatch's wall includes its probe and worker "
            "starts; random search draws the micro-batch from [1, training-set size] (it has no probe), so its OOM "
            "trials are part of its cost.",
            "- Lightning and Accelerate: wall is the search call in the capped child (imports excluded); "
            + "; ".join(
                f"{LABELS[n]}: child process {m['process_seconds']:.0f} s"
                + (f", error: {m['error']}" if m.get("error") else "")
                for n, m in methods.items()
                if "process_seconds" in m
            )
            + ". Their picks use accumulation 1 (they search the batch only); Lightning's with the linear LR rule, "
            "Accelerate's at the base learning rate.",
            "",
            "![tuners](tuners.png)",
            "",
            run.footer(),
        ]
    )


def _relative(value, reference) -> str:
    return f"{value / reference:.2f}" if value and reference else "–"


def plot(args, methods, grid) -> None:
    figure, (left, right) = new_figure(2, width=11, height=4.2)
    ok = [t for t in grid["trials"] if t["status"] == "ok" and t["val_loss"] is not None]
    left.scatter(
        [t["samples_per_second"] for t in ok], [t["val_loss"] for t in ok], s=12, color="lightgrey", label="grid trials"
    )
    markers = itertools.cycle("o^sDvP")
    for name, method in methods.items():
        if method.get("throughput") and method.get("val_loss") is not None:
            left.scatter(
                [method["throughput"]],
                [method["val_loss"]],
                s=60,
                marker=next(markers),
                label=LABELS[name],
                edgecolors="black",
                zorder=3,
            )
    left.set_xlabel("samples/s (grey: the grid's own run; markers: the final measurement)")
    left.set_ylabel("validation loss")
    left.set_yscale("log")
    left.set_title("what each method ends with")
    left.legend(fontsize=7)
    names = list(methods)
    right.barh(range(len(names)), [methods[n]["seconds"] for n in names], color="tab:blue")
    right.set_yticks(range(len(names)), [LABELS[n].split(" (")[0] for n in names], fontsize=8)
    right.set_xlabel("wall time of the search (s)")
    right.set_title("cost")
    save_plot(figure, args.results, "tuners")


if __name__ == "__main__":
    sys.exit(main())
