"""Helpers the benchmark scripts share: arguments, where results go, a run's set-up, tables, plots.

Nothing here imports a framework: each script decides which process trains what.

A full run writes the published tables and plots into ``benchmarks/results/``; a ``--quick``
run writes into ``benchmarks/results/quick/`` (git-ignored) and never touches them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
#: where ``--quick`` runs write: a smoke run must not overwrite the published full-run results
QUICK_RESULTS = RESULTS / "quick"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing it, too

#: a plot's pixels: 900 × 540 at 90 dpi keeps a two-panel line chart well under 200 KB
PLOT_DPI = 90


def parse_args(description: str, configure=None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--quick``, ``--threads`` and ``--results``, plus what ``configure(parser)`` adds.

    ``description`` is the script's docstring; its first line is the ``--help`` text.
    """
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run that finishes in under 5 minutes on 2 CPU cores; "
        f"writes into {_shown(QUICK_RESULTS)}, never over the full run's results",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per training process, the same for both frameworks (intra-op; TensorFlow's inter-op is 1)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"where tables and plots are written (default {_shown(RESULTS)}; {_shown(QUICK_RESULTS)} with --quick)",
    )
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.results is None:
        args.results = QUICK_RESULTS if args.quick else RESULTS
    elif args.quick and args.results.resolve() == RESULTS.resolve():
        parser.error(f"--quick does not write into {_shown(RESULTS)}: the published full-run results are there")
    return args


def cache_folder(args: argparse.Namespace) -> Path:
    """Where a script keeps what it may reuse between runs: the full run's cache is published with its results."""
    return QUICK_RESULTS if args.quick else RESULTS


class Run:
    """One run of a benchmark: its options, the clock, the threads its processes get, and the machine it ran on.

    Made once the options are read (a script's own child processes, started with ``--child``,
    return before: they neither pin again nor spend a second sampling the machine).
    """

    def __init__(self, args: argparse.Namespace, *packages: str) -> None:
        self.args = args
        self.clock = Stopwatch()
        #: the pinned environment, for the processes a script starts with an ``env`` of its own
        self.env = pin_threads(args.threads)
        #: the lines under a table's title: the machine and its load, the libraries, the threads
        self.header = machine_line(*packages) + "\n" + threads_note(args.threads)

    def footer(self) -> str:
        """The table's last line: the command that made it, how long it took, how busy the machine was."""
        return footer(command_line(), self.clock)

    def child_json(self, script: str, label: str, *arguments: str) -> dict:
        """Run ``script`` again in a child with ``arguments`` and this run's threads; its last line out is JSON.

        For measurements that want a fresh process of their own (one framework each, say).
        """
        command = [sys.executable, str(Path(script).resolve()), *arguments, "--threads", str(self.args.threads)]
        completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **self.env})
        if completed.returncode != 0:
            raise SystemExit(f"the {label} run failed:\n{completed.stderr[-3000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


def pin_threads(threads: int) -> dict[str, str]:
    """Give every process started from here ``threads`` compute threads, in either framework.

    Trial workers inherit the environment: PyTorch reads ``OMP_NUM_THREADS`` (its
    intra-op pool), TensorFlow reads ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS``.
    """
    pinned = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    os.environ.update(pinned)
    return pinned


def threads_note(threads: int) -> str:
    return (
        f"Threads pinned: {threads} intra-op thread(s) per training process for both frameworks "
        f"(PyTorch `OMP_NUM_THREADS={threads}`; TensorFlow `TF_NUM_INTRAOP_THREADS={threads}`, "
        "`TF_NUM_INTEROP_THREADS=1`)."
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*packages: str) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def machine_line(*packages: str) -> str:
    """One line that says where and with what a table was measured, and how busy the machine was."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy = cpu_busy_share()
    libraries = versions("torch", "tensorflow-cpu", "tensorflow", "keras", "optuna", *packages)
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared), Linux {platform.release()}, "
        f"Python {platform.python_version()}; {libraries}; {datetime.now():%Y-%m-%d %H:%M}; at the start "
        f"{busy:.0%} of the cores were busy with other work (1 s sample), load average {load:.1f}."
    )


def cpu_busy_share(seconds: float = 1.0) -> float:
    """The share of all cores' time spent busy (or stolen by the hypervisor) over ``seconds``.

    The load average lags by minutes and still counts a benchmark that just ended; this is now.
    """
    before = _machine_ticks()
    time.sleep(seconds)
    after = _machine_ticks()
    if before is None or after is None or after[0] <= before[0]:
        return float("nan")
    return (after[1] - before[1]) / (after[0] - before[0])


def _machine_ticks() -> tuple[int, int] | None:
    """(all ticks, busy ticks) summed over every core since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields)  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total, total - fields[3] - fields[4]


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of every child it has waited for (their children included)."""
    import resource

    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


#: for scripts that time spans of their own (benchmarks/horizon.py)
own_cpu_seconds = _own_cpu_seconds


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` has one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def write_markdown(results: Path, name: str, text: str) -> Path:
    """Print ``text`` and write it to ``results/name.md``."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    print(text)
    print(f"\nwritten: {_shown(path)}")
    return path


def save_plot(figure, results: Path, name: str) -> Path:
    """Save a matplotlib figure as a small PNG under ``results`` and close it."""
    import matplotlib.pyplot as plt

    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    size = path.stat().st_size
    if size > 200_000:
        print(f"warning: {_shown(path)} is {size / 1000:.0f} KB, over the 200 KB wanted", file=sys.stderr)
    print(f"written: {_shown(path)}")
    return path


def new_figure(columns: int = 1, width: float = 10.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width, height), squeeze=False)
    return figure, list(axes[0])


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


class Stopwatch:
    """Wall seconds since creation, and how busy other processes kept the machine meanwhile."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._machine_started = _machine_ticks()
        self._own_started = _own_cpu_seconds()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def others_busy_share(self) -> float:
        """Busy core time not spent by this benchmark or its children, as a share of all cores' time."""
        now = _machine_ticks()
        if now is None or self._machine_started is None or now[0] <= self._machine_started[0]:
            return float("nan")
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        own_ticks = (_own_cpu_seconds() - self._own_started) * ticks_per_second
        others = (now[1] - self._machine_started[1]) - own_ticks
        return max(0.0, others / (now[0] - self._machine_started[0]))

    def __str__(self) -> str:
        return f"{self.seconds:.0f} s"


def footer(command: str, stopwatch: Stopwatch) -> str:
    others = stopwatch.others_busy_share()
    return (
        f"Command: `{command}` — finished in {stopwatch.seconds:.0f} s; meanwhile other processes kept about "
        f"{others:.0%} of the {os.cpu_count()} cores busy (children not yet waited for would count as others)."
    )


def command_line() -> str:
    script = Path(sys.argv[0])
    shown = _shown(script.resolve()) if script.exists() else sys.argv[0]
    return " ".join([".venv/bin/python", shown, *sys.argv[1:]])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


#: a search space's max_effective_batch past any accumulation at the wall: for benchmarks that
#: measure the memory wall itself, which tune() does not look for past the horizon's effective batch
WALL_SEARCH_EFFECTIVE_BATCH = 2**31 - 1
