"""PyTorch against TensorFlow: the same models and data under the same memory budget.

    .venv/bin/python benchmarks/frameworks.py [--quick] [--budget 1GiB] [--trials N]

For ``digits-cnn`` and ``synthetic-images`` (the same architecture, initialisation and
sample order on both backends), on the CPU under one ``RLIMIT_DATA`` budget:

- a sweep of micro-batch sizes at accumulation 1 and 4 (base learning rate, the same
  samples trained per trial): throughput, peak memory and validation loss. Each
  framework has one trial worker (the one ``tune`` uses); the frameworks take turns
  config by config, so load on the shared machine falls on both alike.
- ``autobatch.tune`` on each: the memory wall its probe found (under the 5% margin), the
  recommended config and the time the whole study took.

Writes ``results/frameworks.md``, ``results/frameworks_throughput.png`` and
``results/frameworks_memory.png``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WALL_SEARCH_EFFECTIVE_BATCH,
    Run,
    markdown_table,
    mib,
    new_figure,
    parse_args,
    save_plot,
    write_markdown,
)

FRAMEWORKS = ("torch", "tensorflow")
LABELS = {"torch": "PyTorch", "tensorflow": "TensorFlow"}
TASKS = ("digits-cnn", "synthetic-images")
ACCUMULATION = (1, 4)
#: the micro-batch sizes swept, per task (full run; --quick takes every other one)
MICRO_BATCHES = {
    "digits-cnn": [4, 8, 16, 32, 64, 128, 256, 512, 1024],
    "synthetic-images": [8, 16, 32, 64, 96, 128, 192, 256, 384],
}
QUICK_MICRO_BATCHES = {"digits-cnn": [8, 32, 512], "synthetic-images": [32, 128, 256]}
#: the config at which the two frameworks' validation losses are set side by side
REFERENCE = (32, 1)


def trial_budget(task: str, quick: bool):
    """Full: tune()'s default. Quick: fewer samples, but still a second or so of timed windows."""
    from autobatch import TrialBudget

    if not quick:
        return TrialBudget(train_samples=2048, min_timed_steps=4)
    if task == "digits-cnn":  # its windows take milliseconds: time more of them
        return TrialBudget(train_samples=1024, warmup_steps=2, min_timed_steps=6, val_samples=256)
    return TrialBudget(train_samples=512, warmup_steps=1, min_timed_steps=2, val_samples=256)


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    run = Run(args)
    trials = args.trials or (3 if args.quick else 16)

    sweeps = {}
    for task in TASKS:
        sizes = QUICK_MICRO_BATCHES[task] if args.quick else MICRO_BATCHES[task]
        print(
            f"sweep {task}: micro-batch {sizes} × accumulation {ACCUMULATION}, both frameworks in turn ...", flush=True
        )
        sweeps[task] = sweep(task, sizes, args.budget, trial_budget(task, args.quick), skip_long_windows=args.quick)
    tuned = {}
    for task in TASKS:
        for framework in FRAMEWORKS:
            print(f"tune {task} on {framework}, {trials} trials ...", flush=True)
            tuned[(task, framework)] = tune_one(
                task, framework, args.budget, trials, trial_budget(task, args.quick), second_study=not args.quick
            )
            print(f"  {tuned[(task, framework)].get('summary')}", flush=True)

    text = render(run, sweeps, tuned, trials)
    plot_throughput(args, sweeps)
    plot_memory(args, sweeps, tuned)
    write_markdown(args.results, "frameworks", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--budget", default="1GiB", help="the memory budget, the same for both frameworks")
    parser.add_argument("--trials", type=int, default=None, help="search trials per study (default 16, 3 with --quick)")


def sweep(task: str, sizes: list[int], budget: str, trial_budget, skip_long_windows: bool = False) -> list[dict]:
    """Every (micro-batch, accumulation) on both frameworks, alternating which goes first.

    ``skip_long_windows`` (``--quick``) leaves out configs whose window is larger than the
    trial's sample budget: such a trial trains less than one window before it evaluates, then
    runs its timing windows after, at several times the cost of the others.
    """
    from autobatch import TrialConfig, load_workload
    from autobatch.process.worker import TrialWorker

    workload = load_workload(task)
    workers = {fw: TrialWorker(task, fw, memory_budget=budget, device="cpu") for fw in FRAMEWORKS}
    rows = []
    try:
        turn = 0
        for accumulation in ACCUMULATION:
            for micro in sizes:
                if skip_long_windows and micro * accumulation > trial_budget.train_samples:
                    continue
                order = FRAMEWORKS if turn % 2 == 0 else FRAMEWORKS[::-1]
                turn += 1
                for framework in order:
                    config = TrialConfig(micro, accumulation, workload.base_learning_rate)
                    result = workers[framework].run(config, trial_budget)
                    rows.append(
                        {
                            "framework": framework,
                            "micro_batch": micro,
                            "accumulation": accumulation,
                            "status": result.status,
                            "samples_per_second": result.samples_per_second,
                            "val_loss": result.val_loss,
                            "peak_memory_bytes": result.peak_memory_bytes,
                            "error": (result.error or "").splitlines()[0][:160] if result.status != "ok" else None,
                        }
                    )
                    print(
                        f"  {framework:10s} {micro:5d}×{accumulation} {result.status:5s} "
                        f"{result.samples_per_second or 0:8.0f}/s loss {result.val_loss or float('nan'):.3f} "
                        f"peak {mib(result.peak_memory_bytes) or 0:.0f} MiB",
                        flush=True,
                    )
    finally:
        for worker in workers.values():
            worker.close()
    return rows


def tune_one(task: str, framework: str, budget: str, trials: int, trial_budget, second_study: bool = True) -> dict:
    """``autobatch.tune`` as a user calls it; if it fails, the wall found another way and a second, bounded study."""
    started = time.perf_counter()
    try:
        found = _tune(task, framework, budget, trials, trial_budget)
        found["seconds"] = time.perf_counter() - started
        return found
    except Exception as error:  # a failed study is a result of this benchmark too
        failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        failed_after = time.perf_counter() - started
    print(f"  tune failed after {failed_after:.0f} s: {failure}", flush=True)
    # Workaround: probe with every failed trial counted as out of memory, then search below that wall.
    wall = _wall_counting_failures_as_oom(task, framework, budget, trial_budget)
    if not second_study:
        return {"error": failure, "failed_after": failed_after, "bounded_wall": wall}
    from autobatch import SearchSpace

    started = time.perf_counter()
    try:
        found = _tune(task, framework, budget, trials, trial_budget, SearchSpace(max_micro_batch=wall))
    except Exception as error:
        return {"error": failure, "failed_after": failed_after, "second_error": str(error).splitlines()[0][:200]}
    found.update(seconds=time.perf_counter() - started, error=failure, failed_after=failed_after, bounded_wall=wall)
    return found


def _tune(task, framework, budget, trials, trial_budget, search_space=None) -> dict:
    import autobatch

    with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as folder:
        result = autobatch.tune(
            task,
            framework,
            memory_budget=budget,
            n_trials=trials,
            storage=f"sqlite:///{folder}/frameworks.db",
            study_name=f"{task}-{framework}",
            trial_budget=trial_budget,
            objective="pareto",  # trials of one sample budget, as this comparison has always measured
            max_trial_samples=trial_budget.train_samples,
            # The wall itself is compared: effective batches past the 1-epoch horizon's are searched.
            search_space=dataclasses.replace(
                search_space or autobatch.SearchSpace(), max_effective_batch=WALL_SEARCH_EFFECTIVE_BATCH
            ),
            device="cpu",
        )
    recommended = result.recommended or {}
    return {
        "probe_seconds": float(result.probe.get("seconds", 0.0)),
        "wall": result.max_micro_batch,
        "probe_statuses": [p["status"] for p in result.probe.get("probes", [])],
        "recommended": recommended,
        "n_oom": result.n_oom_trials,
        "n_trials": result.n_trials,
        "summary": f"wall {result.max_micro_batch}, recommended {recommended.get('micro_batch_size')}×"
        f"{recommended.get('accumulation_steps')} lr {recommended.get('learning_rate', 0):.2g}",
    }


def _wall_counting_failures_as_oom(task: str, framework: str, budget: str, trial_budget) -> int:
    """tune()'s probe, but with any failed probe taken as "does not fit" rather than as a broken task."""
    from autobatch import MemoryBudget, TrialConfig, load_workload
    from autobatch.process.worker import TrialWorker
    from autobatch.search.probe import find_memory_wall

    workload = load_workload(task)
    budget_bytes = MemoryBudget.parse(budget).resolve("cpu")
    with TrialWorker(task, framework, memory_budget=int(budget_bytes * 0.95), device="cpu") as worker:

        def run_probe(micro_batch: int):
            result = worker.run(TrialConfig(micro_batch, 1, workload.base_learning_rate), trial_budget)
            if result.status == "error":
                result.status = "oom"
            return result

        probe = find_memory_wall(run_probe, budget_bytes, safety_margin=0.05, upper_limit=len(workload.x_train))
    print(f"  wall with failures counted as OOM: {probe.max_micro_batch}", flush=True)
    return probe.max_micro_batch


# --- tables and plots -------------------------------------------------------------------------


def render(run: Run, sweeps, tuned, trials) -> str:
    args = run.args
    summary_rows = []
    for task in TASKS:
        for framework in FRAMEWORKS:
            rows = [r for r in sweeps[task] if r["framework"] == framework]
            best = {a: _best(rows, a) for a in ACCUMULATION}
            reference = _find(rows, *REFERENCE)
            found = tuned[(task, framework)]
            rec = found.get("recommended") or {}
            summary_rows.append(
                [
                    task,
                    LABELS[framework],
                    _speed(best[1]),
                    _speed(best[4]),
                    _memory_at(rows, REFERENCE[0]),
                    _wall_cell(found),
                    _loss(reference),
                    f"{rec.get('micro_batch_size')} × {rec.get('accumulation_steps')}, lr {rec.get('learning_rate', 0):.2g}"
                    + (" †" if found.get("bounded_wall") else "")
                    if rec
                    else f"– ({found.get('error', 'no feasible trial')})",
                    rec.get("throughput"),
                    rec.get("val_loss"),
                    _time_cell(found),
                ]
            )
    summary = markdown_table(
        [
            "task",
            "framework",
            "best samples/s, acc 1 (at micro-batch)",
            "best samples/s, acc 4 (at micro-batch)",
            f"peak MiB at micro-batch {REFERENCE[0]}",
            "memory wall (probe, 5% margin)",
            f"val loss at {REFERENCE[0]} × {REFERENCE[1]}",
            "tuned recommendation",
            "its samples/s",
            "its val loss",
            "time to tune, s (probe)",
        ],
        summary_rows,
        align="llrrrrrlrrr",
    )
    detail_rows = []
    for task in TASKS:
        sizes = sorted({r["micro_batch"] for r in sweeps[task]})
        for accumulation in ACCUMULATION:
            for micro in sizes:
                if not any(r["micro_batch"] == micro and r["accumulation"] == accumulation for r in sweeps[task]):
                    continue  # not swept (--quick leaves out windows larger than the sample budget)
                cells = [task, f"{micro} × {accumulation}"]
                for framework in FRAMEWORKS:
                    row = _find([r for r in sweeps[task] if r["framework"] == framework], micro, accumulation)
                    if row is None or row["status"] != "ok":
                        status = row["status"] if row else "–"
                        cells += [
                            status.upper() if status == "oom" else status,
                            "",
                            mib(row and row["peak_memory_bytes"]) if status == "oom" else "",
                        ]
                    else:
                        cells += [row["samples_per_second"], _loss(row), mib(row["peak_memory_bytes"])]
                torch_row = _find([r for r in sweeps[task] if r["framework"] == "torch"], micro, accumulation)
                tf_row = _find([r for r in sweeps[task] if r["framework"] == "tensorflow"], micro, accumulation)
                ratio = (
                    f"{tf_row['samples_per_second'] / torch_row['samples_per_second']:.2f}"
                    if torch_row and tf_row and torch_row["samples_per_second"] and tf_row["samples_per_second"]
                    else "–"
                )
                detail_rows.append(cells + [ratio])
    detail = markdown_table(
        [
            "task",
            "micro-batch × accumulation",
            "PyTorch samples/s",
            "PyTorch val loss",
            "PyTorch peak MiB",
            "TensorFlow samples/s",
            "TensorFlow val loss",
            "TensorFlow peak MiB",
            "TF / PT samples/s",
        ],
        detail_rows,
        align="llrrrrrrr",
    )
    failures = sorted(
        {
            f"{r['framework']} {r['micro_batch']}×{r['accumulation']}: {r['error']}"
            for task in TASKS
            for r in sweeps[task]
            if r["status"] not in ("ok",)
        }
    )
    budgets = "; ".join(
        f"{task}: {b.train_samples} samples trained, {b.warmup_steps} warm-up + at least {b.min_timed_steps} timed "
        f"windows, {b.val_samples or 'all'} validation samples"
        for task, b in ((task, trial_budget(task, args.quick)) for task in TASKS)
    )
    return "\n".join(
        [
            f"# PyTorch vs TensorFlow under one memory budget ({args.budget}, CPU)",
            "",
            run.header,
            "",
            summary,
            "",
            f"Sweep: every trial runs at the task's base learning rate (Adam 1e-3); {budgets}. Samples/s is measured after the warm-up windows, data loading "
            "included; peak memory is the trial's data-segment peak (what `RLIMIT_DATA` limits). Best samples/s is the "
            "highest over the swept micro-batches (the micro-batch in brackets). Memory wall and recommendation: "
            f"`autobatch.tune(n_trials={trials})` with the same trial budget; time to tune includes the probe and "
            "every worker start."
            + (
                " With --quick, configs whose window (micro-batch × accumulation) is larger than the trial's sample "
                "budget are not swept."
                if args.quick
                else ""
            ),
            "",
            *_failure_notes(tuned),
            "## Sweep",
            "",
            detail,
            "",
            *(["Trials that did not finish: " + "; ".join(failures), ""] if failures else []),
            "![throughput](frameworks_throughput.png)",
            "![memory](frameworks_memory.png)",
            "",
            run.footer(),
        ]
    )


def _wall_cell(found: dict) -> str:
    if found.get("bounded_wall"):
        return f"{found['bounded_wall']} † (tune failed)"
    return str(found["wall"]) if "wall" in found else f"failed: {found.get('error')}"


def _time_cell(found: dict) -> str:
    if "seconds" not in found and found.get("bounded_wall"):
        return f"failed after {found['failed_after']:.0f} †"
    if "seconds" not in found:
        return f"failed after {found.get('failed_after', 0):.0f}"
    text = f"{found['seconds']:.0f} ({found.get('probe_seconds', 0):.0f})"
    return text + f" †, failed first after {found['failed_after']:.0f}" if found.get("bounded_wall") else text


def _failure_notes(tuned: dict) -> list[str]:
    notes = []
    for (task, framework), found in tuned.items():
        if found.get("error"):
            notes.append(
                f"† `tune({task!r}, {framework!r})` failed: `{found['error']}` after {found['failed_after']:.0f} s. "
                "The wall shown was found by the same probe with every failed probe counted as out of memory"
                + (
                    ", and the recommendation comes from a second `tune()` bounded by "
                    "`SearchSpace(max_micro_batch=wall)` (its time shown)."
                    if found.get("recommended")
                    else " (no second, bounded study with --quick)."
                )
            )
    return notes + ([""] if notes else [])


def _find(rows, micro, accumulation):
    for row in rows:
        if row["micro_batch"] == micro and row["accumulation"] == accumulation:
            return row
    return None


def _best(rows, accumulation):
    ok = [r for r in rows if r["accumulation"] == accumulation and r["status"] == "ok" and r["samples_per_second"]]
    return max(ok, key=lambda r: r["samples_per_second"]) if ok else None


def _speed(row) -> str:
    return f"{row['samples_per_second']:.0f} ({row['micro_batch']})" if row else "–"


def _loss(row) -> str:
    return f"{row['val_loss']:.3f}" if row and row.get("val_loss") is not None else "–"


def _memory_at(rows, micro) -> str:
    row = _find(rows, micro, 1)
    return f"{mib(row['peak_memory_bytes']):.0f}" if row and row["status"] == "ok" and row["peak_memory_bytes"] else "–"


def plot_throughput(args, sweeps) -> None:
    figure, axes = new_figure(len(TASKS), width=10, height=4)
    for axis, task in zip(axes, TASKS, strict=True):
        for framework, colour in zip(FRAMEWORKS, ("tab:orange", "tab:blue"), strict=True):
            for accumulation, style in zip(ACCUMULATION, ("-", "--"), strict=True):
                rows = [r for r in sweeps[task] if r["framework"] == framework and r["accumulation"] == accumulation]
                ok = [r for r in rows if r["status"] == "ok" and r["samples_per_second"]]
                axis.plot(
                    [r["micro_batch"] for r in ok],
                    [r["samples_per_second"] for r in ok],
                    style,
                    marker="o",
                    color=colour,
                    label=f"{LABELS[framework]}, accumulation {accumulation}",
                )
                failed = [r["micro_batch"] for r in rows if r["status"] != "ok"]
                if failed and accumulation == 1:
                    axis.scatter(failed, [0] * len(failed), marker="x", color=colour, zorder=3)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("micro-batch size (x at 0: out of memory)")
        axis.set_ylabel("samples/s")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_plot(figure, args.results, "frameworks_throughput")


def plot_memory(args, sweeps, tuned) -> None:
    from autobatch import MemoryBudget

    budget_mib = MemoryBudget.parse(args.budget).resolve("cpu") / 2**20
    figure, axes = new_figure(len(TASKS), width=10, height=4)
    for axis, task in zip(axes, TASKS, strict=True):
        for framework, colour in zip(FRAMEWORKS, ("tab:orange", "tab:blue"), strict=True):
            rows = [r for r in sweeps[task] if r["framework"] == framework and r["accumulation"] == 1]
            ok = [r for r in rows if r["status"] == "ok" and r["peak_memory_bytes"]]
            axis.plot(
                [r["micro_batch"] for r in ok],
                [mib(r["peak_memory_bytes"]) for r in ok],
                marker="o",
                color=colour,
                label=f"{LABELS[framework]} peak",
            )
            wall = tuned[(task, framework)].get("wall")
            if wall:
                axis.axvline(wall, color=colour, linestyle=":", label=f"{LABELS[framework]} wall ({wall})")
        axis.axhline(budget_mib, color="black", linestyle="--", linewidth=1, label=f"budget {args.budget}")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("micro-batch size (accumulation 1)")
        axis.set_ylabel("peak memory (MiB)")
        axis.set_title(task)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_plot(figure, args.results, "frameworks_memory")


if __name__ == "__main__":
    sys.exit(main())
