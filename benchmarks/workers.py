"""Trials per minute with 1 and 2 workers on one PostgreSQL study, side by side in one run.

    .venv/bin/python benchmarks/workers.py [--quick]     # starts a throwaway PostgreSQL server
    .venv/bin/python benchmarks/workers.py --storage postgresql+psycopg://user:password@host:5432/db
    .venv/bin/python benchmarks/workers.py --task digits-cnn --backend tensorflow --trials 12 --workers 1 2 4

For each worker count, a study of its own: ``autobatch tune --trials 1`` creates it and
probes the memory wall (not timed), then the workers (``autobatch worker --study-trials``)
start together and run ``--trials`` more; the clock runs from their start to the last
one's exit, start-up included. "Steady" counts from the first timed trial's start to the
last one's end. On a CPU every worker trains with ``--threads`` threads (default 1), as
one device per worker would; on a shared machine the figures move with the neighbours'
load. Writes ``results/NAME.md`` and ``results/NAME.png`` (``--name``, default ``workers``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    Run,
    markdown_table,
    new_figure,
    parse_args,
    save_plot,
    write_markdown,
)


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    run = Run(args, "psycopg")
    trials = args.trials or (6 if args.quick else 8)
    server = None
    storage = args.storage
    if storage is None:
        from tests.postgres import start_private_server

        server = start_private_server()
        storage = server.create_database("autobatch_bench")
    try:
        rows = []
        for workers in args.workers:
            print(f"{workers} worker(s), {trials} timed trials ...", flush=True)
            rows.append(measure(storage, args, workers, trials, run.env))
            print(f"  {rows[-1]['per_minute']:.1f} trials/min", flush=True)
    finally:
        if server is not None:
            server.stop()
    text = render(rows, run, trials)
    plot(rows, args)
    write_markdown(args.results, args.name, text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--storage", default=None, help="a PostgreSQL URL (default: start a throwaway server)")
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--memory-budget", default="1GiB")
    parser.add_argument("--samples", type=int, default=1024, help="samples trained per trial")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--trials", type=int, default=None, help="timed trials per worker count (default 8, 6 with --quick)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--name", default="workers", help="file name of the table and plot under --results")


def measure(storage: str, args, workers: int, trials: int, env: dict) -> dict:
    from autobatch.search.results import load_existing_study

    name = f"bench-{args.task}-{args.backend}-{workers}w-{datetime.now():%Y%m%d%H%M%S}"
    common = [
        args.task,
        "--backend",
        args.backend,
        "--memory-budget",
        args.memory_budget,
        "--samples",
        str(args.samples),
        "--device",
        args.device,
        "--storage",
        storage,
        "--study-name",
        name,
    ]
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "autobatch", "tune", *common, "--trials", "1", "--json"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "autobatch", "worker", *common, "--study-trials", str(1 + trials), "--json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(
                f"a worker failed: {stderr.strip().splitlines()[-1] if stderr.strip() else process.returncode}"
            )
    wall = time.perf_counter() - started
    study = load_existing_study(storage, name)
    timed = [t for t in study.get_trials(deepcopy=False) if t.number >= 1 and t.state.name == "COMPLETE"]
    first = min(t.datetime_start for t in timed)
    last = max(t.datetime_complete for t in timed)
    steady = (last - first).total_seconds()
    return {
        "workers": workers,
        "trials": len(timed),
        "wall": wall,
        "per_minute": len(timed) / wall * 60,
        "steady_per_minute": len(timed) / steady * 60 if steady > 0 else float("nan"),
        "trial_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in timed) / len(timed),
    }


def render(rows: list[dict], run: Run, trials: int) -> str:
    args = run.args
    base = rows[0]["per_minute"]
    table = markdown_table(
        ["workers", "timed trials", "wall (s)", "trials/min", "speed-up", "trials/min, steady", "mean trial (s)"],
        [
            [
                r["workers"],
                r["trials"],
                r["wall"],
                r["per_minute"],
                f"{r['per_minute'] / base:.2f}×",
                r["steady_per_minute"],
                r["trial_seconds"],
            ]
            for r in rows
        ],
        align="rrrrrrr",
    )
    return "\n".join(
        [
            "# Trials per minute by worker count, one PostgreSQL study",
            "",
            run.header,
            "",
            f"{args.task} on {args.backend} ({args.device}), budget {args.memory_budget}, {args.samples} samples per "
            f"trial, {trials} timed trials per worker count.",
            "",
            table,
            "",
            "Wall: from the workers' start (processes, imports, joining the study) to the last one's exit. "
            "Steady: from the first timed trial's start to the last one's end. Mean trial: ask to tell, per trial. "
            f"With {os.cpu_count()} cores shared with other work, more workers than free cores cannot scale.",
            "",
            f"![{args.name}]({args.name}.png)",
            "",
            run.footer(),
        ]
    )


def plot(rows: list[dict], args) -> None:
    figure, (axis,) = new_figure(1, width=6, height=3.6)
    counts = [r["workers"] for r in rows]
    axis.plot(counts, [r["per_minute"] for r in rows], marker="o", label="wall (start-up included)")
    axis.plot(counts, [r["steady_per_minute"] for r in rows], marker="s", label="steady")
    axis.plot(
        counts,
        [rows[0]["per_minute"] * c / counts[0] for c in counts],
        linestyle="--",
        color="grey",
        label="linear from 1 worker",
    )
    axis.set_xticks(counts)
    axis.set_xlabel("workers")
    axis.set_ylabel("trials per minute")
    axis.set_title(f"{args.task} on {args.backend}, one PostgreSQL study", fontsize=10)
    axis.legend(fontsize=8)
    save_plot(figure, args.results, args.name)


if __name__ == "__main__":
    sys.exit(main())
