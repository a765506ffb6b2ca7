"""Trials per minute with 1 and 2 workers on one PostgreSQL study, side by side in one run.

    python benchmarks/workers.py                      # starts a throwaway PostgreSQL server
    python benchmarks/workers.py --storage postgresql+psycopg://user:password@host:5432/db
    python benchmarks/workers.py --task digits-cnn --backend tensorflow --trials 12 --workers 1 2 4

For each worker count, a study of its own: ``autobatch tune --trials 1`` creates it and
probes the memory wall (not timed), then the workers (``autobatch worker --study-trials``)
start together and run ``--trials`` more; the clock runs from their start to the last
one's exit, start-up included. "Steady" counts from the first timed trial's start to the
last one's end. On a CPU every worker trains with ``--threads`` threads (default 1), as
one device per worker would; on a shared machine the figures move with the neighbours'
load. The table is printed and written to ``benchmarks/results/workers.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None, help="a PostgreSQL URL (default: start a throwaway server)")
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--memory-budget", default="1GiB")
    parser.add_argument("--samples", type=int, default=1024, help="samples trained per trial")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=8, help="timed trials per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker (OMP_NUM_THREADS)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "workers.md")
    args = parser.parse_args()

    server = None
    storage = args.storage
    if storage is None:
        from tests.postgres import start_private_server

        server = start_private_server()
        storage = server.create_database("autobatch_bench")
    try:
        rows = [measure(storage, args, workers) for workers in args.workers]
    finally:
        if server is not None:
            server.stop()
    table = render(rows, args)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(f"written to {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


def measure(storage: str, args, workers: int) -> dict:
    from autobatch.study import load_existing_study

    name = f"bench-{args.task}-{args.backend}-{workers}w-{datetime.now():%Y%m%d%H%M%S}"
    common = [args.task, "--backend", args.backend, "--memory-budget", args.memory_budget, "--samples",
              str(args.samples), "--device", args.device, "--storage", storage, "--study-name", name]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads), TF_NUM_INTEROP_THREADS="1",
               TF_NUM_INTRAOP_THREADS=str(args.threads))
    subprocess.run([sys.executable, "-m", "autobatch", "tune", *common, "--trials", "1", "--json"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    processes = [
        subprocess.Popen([sys.executable, "-m", "autobatch", "worker", *common, "--study-trials", str(1 + args.trials),
                          "--json"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a worker failed: {stderr.strip().splitlines()[-1] if stderr.strip() else process.returncode}")
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


def render(rows: list[dict], args) -> str:
    base = rows[0]["per_minute"]
    lines = [
        f"# Trials per minute by worker count, one PostgreSQL study",
        "",
        f"{args.task} on {args.backend} ({args.device}), budget {args.memory_budget}, {args.samples} samples per "
        f"trial, {args.threads} thread(s) per worker; {platform.node()}, {os.cpu_count()} CPUs, "
        f"{datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "| workers | timed trials | wall (s) | trials/min | speed-up | trials/min, steady | mean trial (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['trials']} | {row['wall']:.1f} | {row['per_minute']:.1f} | "
            f"{row['per_minute'] / base:.2f}x | {row['steady_per_minute']:.1f} | {row['trial_seconds']:.2f} |"
        )
    lines += [
        "",
        "Wall: from the workers' start (processes, imports, joining the study) to the last one's exit. "
        "Steady: from the first timed trial's start to the last one's end. Mean trial: ask to tell, per trial.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
