"""Per-trial cost: a new process per trial (before) against trials forked from a loaded template (after).

    .venv/bin/python benchmarks/costs.py [--quick] [--task digits-cnn] [--trials N]

Two measurements, each alternating before and after in one run:

1. Workers. Two ``TrialWorker``\\ s under the same budget, ``fork=False`` (every trial starts
   a Python process, imports the framework and loads the task) and the default
   ``fork=True`` (one child imports and loads once, then forks a clean process per
   trial). They take turns on the same configs. The table gives the mean per trial of
   what each trial reports in ``TrialResult.timings`` (worker start, framework import,
   task load, the trial itself, wall time seen by the caller), the first trial of the
   forked worker included, so its start-up is spread over the trials as in a study.
2. Studies. ``autobatch.tune`` end to end, once as shipped and once with its
   ``TrialWorker`` made ``fork=False`` (patched in this process only): wall time, probe
   time, ``TuneResult.costs`` (mean per trial), and the study's own share per trial
   (sampler, storage writes, note): the search phase's wall time less its trials' wall
   times, divided by the number of trials.

Writes ``results/costs.md`` and ``results/costs.png``.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Run,
    markdown_table,
    new_figure,
    parse_args,
    save_plot,
    write_markdown,
)

BUDGET = "1GiB"
KEYS = ("worker_start", "framework_import", "task_load", "trial", "wall")
MODES = {"new process per trial (fork=False)": False, "forked from a template (default)": True}


def trial_budget():
    from autobatch import TrialBudget

    return TrialBudget(train_samples=512)


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    run = Run(args)
    trials = args.trials or (6 if args.quick else 12)
    backends = ["torch", "tensorflow"]
    study_backends = ["torch"] if args.quick else ["torch", "tensorflow"]

    workers = {}
    for backend in backends:
        print(f"workers, {backend}: {trials} trials per mode, alternating ...", flush=True)
        workers[backend] = compare_workers(args.task, backend, trials)
    studies = {}
    for backend in study_backends:
        print(f"studies, {backend}: tune(n_trials={trials}) per mode ...", flush=True)
        studies[backend] = compare_studies(args.task, backend, trials)

    text = render(run, workers, studies, trials)
    plot(args, workers)
    write_markdown(args.results, "costs", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--task", default="digits-cnn")
    parser.add_argument("--trials", type=int, default=None, help="trials per mode (default 12, 6 with --quick)")


def configs(task: str, count: int):
    """A spread of configs such as a search draws (micro-batch 8-128, accumulation 1-4)."""
    from autobatch import TrialConfig, load_workload

    workload = load_workload(task)
    shapes = [(32, 1), (8, 4), (128, 1), (16, 2), (64, 1), (32, 4)]
    return [TrialConfig(m, a, workload.base_learning_rate) for m, a in (shapes * count)[:count]]


def compare_workers(task: str, backend: str, trials: int) -> dict:
    from autobatch.process.worker import TrialWorker

    pool = {
        name: TrialWorker(task, backend, memory_budget=BUDGET, device="cpu", fork=fork) for name, fork in MODES.items()
    }
    timings: dict[str, list[dict]] = {name: [] for name in MODES}
    names = list(MODES)
    try:
        for number, config in enumerate(configs(task, trials)):
            for name in names if number % 2 == 0 else names[::-1]:
                result = pool[name].run(config, trial_budget())
                if result.status != "ok":
                    raise SystemExit(f"{backend} {name}: trial {config} ended {result.status}: {result.error}")
                timings[name].append(result.timings)
    finally:
        for worker in pool.values():
            worker.close()
    return {name: _means(rows) for name, rows in timings.items()}


def _means(rows: list[dict]) -> dict:
    means = {key: sum(row.get(key, 0.0) for row in rows) / len(rows) for key in KEYS}
    means["overhead"] = means["wall"] - means["trial"]
    means["first_wall"] = rows[0]["wall"]
    means["later_wall"] = sum(row["wall"] for row in rows[1:]) / max(1, len(rows) - 1)
    return means


def compare_studies(task: str, backend: str, trials: int) -> dict:
    import autobatch.search.tune as study_module

    shipped = study_module.TrialWorker
    found = {}
    try:
        for name, fork in MODES.items():
            study_module.TrialWorker = shipped if fork else functools.partial(shipped, fork=False)
            with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as folder:
                started = time.perf_counter()
                result = study_module.tune(
                    task,
                    backend,
                    memory_budget=BUDGET,
                    n_trials=trials,
                    storage=f"sqlite:///{folder}/costs.db",
                    study_name="costs",
                    trial_budget=trial_budget(),
                    objective="pareto",  # trials of one sample budget, as this table has always measured
                    max_trial_samples=trial_budget().train_samples,
                    device="cpu",
                )
                wall = time.perf_counter() - started
                walls = [
                    t.user_attrs.get("timings", {}).get("wall", 0.0) for t in result.study.get_trials(deepcopy=False)
                ]
            probe_seconds = float(result.probe.get("seconds", 0.0))
            search = wall - probe_seconds - result.costs.get("storage_open_seconds", 0.0)
            found[name] = {
                "wall": wall,
                "probe_seconds": probe_seconds,
                "probes": len(result.probe.get("probes", [])),
                "n_trials": result.n_trials,
                "costs": dict(result.costs),
                "study_share": (search - sum(walls)) / max(1, result.n_trials),
                "recommended": result.recommended,
            }
    finally:
        study_module.TrialWorker = shipped
    return found


def render(run: Run, workers, studies, trials) -> str:
    args = run.args
    worker_rows = []
    for backend, modes in workers.items():
        for name, means in modes.items():
            worker_rows.append(
                [backend, name]
                + [
                    f"{means[key]:.2f}"
                    for key in ("worker_start", "framework_import", "task_load", "trial", "overhead", "wall")
                ]
                + [f"{means['first_wall']:.2f}", f"{means['later_wall']:.2f}"]
            )
        before, after = modes.values()
        worker_rows.append(
            [
                backend,
                "**after / before**",
                "",
                "",
                "",
                f"{after['trial'] / before['trial']:.2f}×",
                f"{after['overhead'] / before['overhead']:.2f}×",
                f"**{after['wall'] / before['wall']:.2f}×**",
                "",
                "",
            ]
        )
    worker_table = markdown_table(
        [
            "backend",
            "worker",
            "worker start",
            "framework import",
            "task load",
            "trial",
            "overhead (wall − trial)",
            "wall",
            "first trial wall",
            "later trials wall",
        ],
        worker_rows,
        align="llrrrrrrrr",
    )
    study_rows = []
    for backend, modes in studies.items():
        for name, found in modes.items():
            costs = found["costs"]
            study_rows.append(
                [
                    backend,
                    name,
                    f"{found['wall']:.1f}",
                    f"{found['probe_seconds']:.1f} ({found['probes']} probes)",
                    found["n_trials"],
                    f"{costs.get('mean_worker_start_seconds', 0):.2f}",
                    f"{costs.get('mean_framework_import_seconds', 0):.2f}",
                    f"{costs.get('mean_task_load_seconds', 0):.2f}",
                    f"{costs.get('mean_trial_seconds', 0):.2f}",
                    f"{costs.get('mean_wall_seconds', 0):.2f}",
                    f"{found['study_share']:.2f}",
                    f"{costs.get('storage_open_seconds', 0):.2f}",
                ]
            )
        before, after = modes.values()
        study_rows.append(
            [
                backend,
                "**after / before**",
                f"**{after['wall'] / before['wall']:.2f}×**",
                f"{after['probe_seconds'] / before['probe_seconds']:.2f}×",
                "",
                "",
                "",
                "",
                "",
                f"{after['costs'].get('mean_wall_seconds', 0) / max(before['costs'].get('mean_wall_seconds', 1e-9), 1e-9):.2f}×",
                "",
                "",
            ]
        )
    study_table = markdown_table(
        [
            "backend",
            "worker",
            "tune() wall (s)",
            "probe (s)",
            "trials",
            "worker start",
            "framework import",
            "task load",
            "trial",
            "trial wall",
            "study's share per trial",
            "storage open (s)",
        ],
        study_rows,
        align="llrrrrrrrrrr",
    )
    return "\n".join(
        [
            f"# Per-trial cost: new process per trial vs forked template ({args.task}, budget {BUDGET})",
            "",
            run.header,
            "",
            f"## Trial workers, {trials} trials each, alternating (mean seconds per trial)",
            "",
            worker_table,
            "",
            "Worker start: from the child's process start to its first line of our code; framework import and task "
            "load: in the child, paid by the forked worker's first trial only (later trials report 0). Overhead: the "
            "caller's wall time less the trial itself (process start, imports, data load, fork, pipes).",
            "",
            f"## Studies: `autobatch.tune(n_trials={trials})` end to end",
            "",
            study_table,
            "",
            "Columns from worker start to trial wall are `TuneResult.costs` (means over the search trials, in seconds). "
            "Study's share per trial: (tune wall − probe − storage open − Σ trial walls) / trials, i.e. sampler, storage "
            "writes and the dashboard note. Each mode's study runs its own probe (its workers are patched too).",
            "",
            run.footer(),
        ]
    )


def plot(args, workers) -> None:
    figure, axes = new_figure(len(workers), width=9, height=3.6)
    parts = [
        ("worker_start", "worker start"),
        ("framework_import", "framework import"),
        ("task_load", "task load"),
        ("trial", "trial"),
        ("rest", "fork, pipes, waiting"),
    ]
    colours = ["tab:grey", "tab:red", "tab:purple", "tab:green", "tab:olive"]
    for axis, (backend, modes) in zip(axes, workers.items(), strict=True):
        bottoms = [0.0] * len(modes)
        for (key, label), colour in zip(parts, colours, strict=True):
            values = []
            for means in modes.values():
                if key == "rest":
                    values.append(max(0.0, means["wall"] - sum(means[k] for k in KEYS if k != "wall")))
                else:
                    values.append(means[key])
            axis.bar(range(len(modes)), values, bottom=bottoms, color=colour, label=label)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        axis.set_xticks(range(len(modes)), ["new process\nper trial", "forked\ntemplate"])
        axis.set_ylabel("seconds per trial (mean)")
        axis.set_title(backend)
    axes[-1].legend(fontsize=7, loc="upper right")
    save_plot(figure, args.results, "costs")


if __name__ == "__main__":
    sys.exit(main())
