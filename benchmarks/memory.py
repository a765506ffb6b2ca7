"""Micro-batching's memory saving on the CPU under each allocator setting a trial can run with, and its speed.

    .venv/bin/python benchmarks/memory.py [--quick] [--threads 1] [--rounds N] [--samples N]

A trial on the CPU runs under ``RLIMIT_DATA``, which counts the data segment: what the
allocator holds, not what the model uses. glibc's default raises its mmap threshold to the
largest block freed so far, after which freed activations stay in a heap it does not give
back, and a small micro-batch saves less than it should. Each setting below starts its own
trial workers with that setting in their environment (as ``autobatch.process.child.start_child``
passes it on) and runs ``synthetic-images`` at 64×4 and at 256×1 (the same effective batch),
under an 8 GiB budget (no wall is near), on PyTorch and on TensorFlow:

- autobatch's default (``autobatch.process.child.allocator_environment``), nothing else set;
- glibc's default (``AUTOBATCH_ALLOCATOR=glibc-default``: dynamic mmap threshold);
- ``MALLOC_MMAP_THRESHOLD_`` fixed at the other values tried (64 KiB, 128 KiB, 1 MiB);
- transparent huge pages for what glibc maps (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35+),
  with glibc's default and with a fixed threshold: fewer page faults where they apply;
- ``MALLOC_TRIM_THRESHOLD_`` alone (setting it also freezes the mmap threshold at its 128 KiB start);
- jemalloc and tcmalloc through ``LD_PRELOAD`` (Debian's ``libjemalloc2`` and
  ``libtcmalloc-minimal4``), where installed.

"Peak above baseline" is the trial's own reading (``peak_memory_bytes - baseline_memory_bytes``:
the baseline is the model and the data in memory, before training). Since an allocator may
hold address space that resident memory does not show, the trial process's ``VmData`` (what
``RLIMIT_DATA`` compares with the budget) is also sampled from outside every 5 ms: where its
peak exceeds the trial's reading, a wall measured under that setting would not hold. All
workers of a framework stay up together and the settings take turns, round by round, so the
load of a shared machine falls on all alike. Peaks, CPU time and page faults (read from
``/proc`` the same way) are medians over the rounds, samples/s the best round. Target: 64×4's
peak above baseline ≤ 0.45× 256×1's, on both frameworks, at no more CPU time than glibc's default.
Writes ``results/memory.md`` and ``results/memory.png``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Run, markdown_table, median, mib, new_figure, parse_args, save_plot, write_markdown  # noqa: E402

from autobatch.process.child import ALLOCATOR_VARIABLE, allocator_environment  # noqa: E402 - framework-free

TASK = "synthetic-images"
CONFIGS = ((64, 4), (256, 1))  # (micro-batch, accumulation): the same effective batch
FRAMEWORKS = ("torch", "tensorflow")
MEMORY_BUDGET = "8GiB"
TARGET_RATIO = 0.45
#: every variable that decides a process's allocator: none may leak in from the shell that runs this
ALLOCATOR_VARIABLES = (
    ALLOCATOR_VARIABLE,
    "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_CONF",
    "GLIBC_TUNABLES",
)
#: the fixed mmap thresholds tried (the second without huge pages only)
THRESHOLDS = (2**16, 2**17, 2**20)
SAMPLE_SECONDS = 0.005
#: a VmData gap this much above glibc default's marks a setting whose reading misses what it holds
UNSEEN_MARGIN = 32 * 2**20


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    for name in ALLOCATOR_VARIABLES:
        os.environ.pop(name, None)
    run = Run(args)
    rounds = args.rounds or (1 if args.quick else 3)
    samples = args.samples or (512 if args.quick else 1024)
    settings = allocator_settings(args.quick)
    if args.settings:
        keep = ("autobatch", "glibc default", *args.settings)  # the target's row and the reference stay
        settings = [(label, env) for label, env in settings if any(word in label for word in keep)]
    results = {}
    for framework in args.frameworks:
        print(f"{framework}: {len(settings)} settings × {len(CONFIGS)} configs × {rounds} rounds ...", flush=True)
        results[framework] = measure(framework, settings, rounds, samples)
    text = render(run, settings, results, rounds, samples)
    plot(args, settings, results)
    write_markdown(args.results, "memory", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 3, 1 with --quick)")
    parser.add_argument("--samples", type=int, default=None, help="samples per trial (default 1024, 512 with --quick)")
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument(
        "--settings", nargs="+", default=None, help="only the settings whose label holds one of these words"
    )


def allocator_settings(quick: bool) -> list[tuple[str, dict[str, str]]]:
    """(label, the variables a worker starts with) for each setting measured; the first is autobatch's."""
    default = allocator_environment({})
    label = " + ".join(f"{k}={v}" for k, v in default.items()) or "nothing set"
    settings = [(f"autobatch's default ({label})", {})]
    glibc_default = {ALLOCATOR_VARIABLE: "glibc-default"}
    huge_pages = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    candidates = [("glibc default", glibc_default, True)]
    candidates += [("glibc default + " + _shown(huge_pages), {**glibc_default, **huge_pages}, False)]
    # autobatch adds huge pages wherever the user did not choose: the rows without say no.
    no_huge_pages = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    for threshold in THRESHOLDS:
        fixed = {"MALLOC_MMAP_THRESHOLD_": str(threshold)}
        label = f"MALLOC_MMAP_THRESHOLD_={_size(threshold)}"
        candidates.append((label, {**fixed, **no_huge_pages}, threshold == THRESHOLDS[0]))
        if threshold != THRESHOLDS[1]:
            label = f"MALLOC_MMAP_THRESHOLD_={_size(threshold)} + {_shown(huge_pages)}"
            candidates.append((label, {**fixed, **huge_pages}, False))
    arenas = {"MALLOC_ARENA_MAX": "1"}
    candidates.append(("autobatch's default + MALLOC_ARENA_MAX=1", arenas, False))
    # Setting the trim threshold also freezes the mmap threshold where it starts, at 128 KiB.
    trim = {**glibc_default, "MALLOC_TRIM_THRESHOLD_": str(2**17)}
    candidates.append((f"MALLOC_TRIM_THRESHOLD_={_size(2**17)} alone", trim, False))
    for name, library in (("jemalloc", "jemalloc"), ("tcmalloc", "tcmalloc_minimal")):
        found = ctypes.util.find_library(library)
        if found:
            candidates.append((f"{name} (LD_PRELOAD={found})", {"LD_PRELOAD": found}, True))
        else:
            print(f"{name}: not installed, left out (Debian: lib{library}*)", file=sys.stderr)
    for label, env, in_quick in candidates:
        if (in_quick or not quick) and env != default:
            settings.append((label, env))
    return settings


def _shown(env: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in env.items())


def _size(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


# --- measuring ---------------------------------------------------------------------------------


def measure(framework: str, settings, rounds: int, samples: int) -> dict[str, dict]:
    """Per setting label: per config, the trials' readings; the settings take turns round by round."""
    from autobatch import TrialBudget, TrialConfig, load_workload
    from autobatch.process.worker import TrialWorker

    learning_rate = load_workload(TASK).base_learning_rate
    budget = TrialBudget(train_samples=samples)
    workers = {label: TrialWorker(TASK, framework, memory_budget=MEMORY_BUDGET, device="cpu") for label, _ in settings}
    found: dict[str, dict] = {label: {config: [] for config in CONFIGS} for label, _ in settings}
    try:
        for round_number in range(rounds):
            shift = round_number % len(settings)
            for label, env in settings[shift:] + settings[:shift]:
                for micro, accumulation in CONFIGS[round_number % 2 :] + CONFIGS[: round_number % 2]:
                    config = TrialConfig(micro, accumulation, learning_rate)
                    reading = one_trial(workers[label], env, config, budget)
                    found[label][(micro, accumulation)].append(reading)
                    print(f"  {label} {micro}×{accumulation}: {_said(reading)}", file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return found


def one_trial(worker, env: dict[str, str], config, budget) -> dict:
    """A trial in ``worker`` (started, on first use, with ``env`` added to this environment), and what it held."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    sampler = DataSegmentSampler(worker)
    try:
        sampler.start()
        result = worker.run(config, budget)
    finally:
        sampler.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    above = None
    if result.peak_memory_bytes is not None and result.baseline_memory_bytes is not None:
        above = result.peak_memory_bytes - result.baseline_memory_bytes
    unseen = None
    if sampler.peak_bytes is not None and result.peak_memory_bytes is not None:
        unseen = sampler.peak_bytes - result.peak_memory_bytes
    return {
        "status": result.status,
        "above_baseline": above,
        "peak": result.peak_memory_bytes,
        "vmdata_peak": sampler.peak_bytes,
        "unseen": unseen,
        "samples_per_second": result.samples_per_second,
        "cpu_seconds": sampler.cpu_seconds(),
        "page_faults": sampler.page_faults(),
        "allocator": result.extras.get("allocator"),
        "error": (result.error or "").strip().splitlines()[-1:],
    }


def _said(reading: dict) -> str:
    if reading["status"] != "ok":
        return f"{reading['status']}: {' '.join(reading['error'])[:300]}"
    return (
        f"{mib(reading['above_baseline']):.0f} MiB above baseline, VmData − reading "
        f"{mib(reading['unseen'] or 0):+.0f} MiB, {reading['samples_per_second']:.0f} samples/s, "
        "CPU {:.1f} s user + {:.1f} s system, ".format(*reading["cpu_seconds"])
        + f"{reading['page_faults']:,} page faults"
    )


class DataSegmentSampler:
    """The largest ``VmData`` of a worker's trial processes (its children), and their CPU time, from outside.

    CPU seconds (user, system) say what a setting costs better than samples/s on a shared
    machine: another process's load stretches the wall clock, much less the work done.
    """

    def __init__(self, worker) -> None:
        self.worker = worker
        self.peak_bytes: int | None = None
        self._cpu_ticks: dict[int, tuple[int, int, int]] = {}  # the last (page faults, user, system) per process
        self._earlier: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        # The last trial's process may still be on its way out: its figures are not this trial's.
        process = getattr(self.worker, "_process", None)
        self._earlier = set(_children(process.pid)) if process is not None else set()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            process = getattr(self.worker, "_process", None)  # started by the worker on its first trial
            if process is None:
                continue
            for pid in _children(process.pid):
                if pid in self._earlier:
                    continue
                value = _vmdata(pid)
                if value is not None and (self.peak_bytes is None or value > self.peak_bytes):
                    self.peak_bytes = value
                ticks = _cpu_ticks(pid)
                if ticks is not None:
                    self._cpu_ticks[pid] = ticks

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) seconds of the trial processes, as last read (within one sample of their end)."""
        per_second = os.sysconf("SC_CLK_TCK")
        return (
            sum(user for _, user, _ in self._cpu_ticks.values()) / per_second,
            sum(system for _, _, system in self._cpu_ticks.values()) / per_second,
        )

    def page_faults(self) -> int:
        """Minor page faults of the trial processes: a fresh page each, which the kernel zero-fills."""
        return sum(faults for faults, _, _ in self._cpu_ticks.values())


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _cpu_ticks(pid: int) -> tuple[int, int, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[7]), int(fields[11]), int(fields[12])  # minflt, utime, stime: fields 10, 14, 15 of stat(5)
    except (OSError, ValueError, IndexError):
        return None


def _vmdata(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- the table and the plot --------------------------------------------------------------------


def summary(readings: dict) -> dict:
    """One setting on one framework over the rounds: median peaks and CPU time, best samples/s, the ratio judged."""
    out: dict = {}
    for config, trials in readings.items():
        ok = [t for t in trials if t["status"] == "ok"]
        out[config] = {
            "above": median(t["above_baseline"] for t in ok) if ok else None,
            "rate": max((t["samples_per_second"] for t in ok), default=None),  # the least disturbed round
            "user": median(t["cpu_seconds"][0] for t in ok) if ok else None,
            "system": median(t["cpu_seconds"][1] for t in ok) if ok else None,
            "faults": median(t["page_faults"] for t in ok) if ok else None,
            "unseen": max((t["unseen"] for t in ok if t["unseen"] is not None), default=None),
            "failed": [t["status"] for t in trials if t["status"] != "ok"],
        }
    small, large = (out[config]["above"] for config in CONFIGS)
    out["ratio"] = small / large if small is not None and large else None
    complete = all(out[config]["user"] is not None for config in CONFIGS)
    out["user"] = sum(out[config]["user"] for config in CONFIGS) if complete else None
    out["system"] = sum(out[config]["system"] for config in CONFIGS) if complete else None
    out["cpu"] = out["user"] + out["system"] if complete else None
    out["faults"] = sum(out[config]["faults"] for config in CONFIGS) if complete else None
    return out


def render(run: Run, settings, results, rounds: int, samples: int) -> str:
    rows = []
    verdicts = {}
    for framework, by_setting in results.items():
        reference = summary(by_setting["glibc default"])
        for index, (label, _) in enumerate(settings):
            s = summary(by_setting[label])
            met = s["ratio"] is not None and s["ratio"] <= TARGET_RATIO
            if index == 0:
                verdicts[framework] = met
            cost = s["cpu"] / reference["cpu"] if s["cpu"] and reference["cpu"] else None
            unseen = [s[config]["unseen"] for config in CONFIGS if s[config]["unseen"] is not None]
            failed = [f for config in CONFIGS for f in s[config]["failed"]]
            rows.append(
                [
                    framework,
                    f"**{label}**" if index == 0 else label,
                    mib(s[CONFIGS[0]]["above"]),
                    mib(s[CONFIGS[1]]["above"]),
                    f"**{s['ratio']:.2f}×**" if s["ratio"] is not None else None,
                    ("met" if met else "**not met**") + (f" ({', '.join(failed)})" if failed else ""),
                    s[CONFIGS[0]]["rate"],
                    s[CONFIGS[1]]["rate"],
                    f"{s['user']:.1f} + {s['system']:.1f}" if s["cpu"] is not None else None,
                    f"{cost:.2f}×" if cost is not None else None,
                    f"{s['faults'] / 1000:,.0f}k" if s["faults"] is not None else None,
                    f"{mib(max(unseen)):+.0f}" if unseen else None,
                ]
            )
    (m1, k1), (m2, k2) = CONFIGS
    table = markdown_table(
        [
            "framework",
            "allocator setting",
            f"{m1}×{k1}: peak above baseline (MiB)",
            f"{m2}×{k2}: peak above baseline (MiB)",
            f"{m1}×{k1} / {m2}×{k2}",
            f"≤ {TARGET_RATIO}×",
            f"{m1}×{k1} samples/s (best round)",
            f"{m2}×{k2} samples/s (best round)",
            "CPU s per pair of trials: user + system",
            "CPU time vs glibc default",
            "page faults per pair",
            "VmData peak − reading (MiB)",
        ],
        rows,
        align="llrrrlrrrrrr",
    )
    verdict = " and ".join(f"{fw} {'met' if ok else 'not met'}" for fw, ok in verdicts.items())
    return "\n".join(
        [
            "# Micro-batching's memory saving on the CPU, per allocator setting",
            "",
            run.header,
            "",
            table,
            "",
            f"Target (autobatch's default, in bold): {m1}×{k1}'s peak above baseline ≤ {TARGET_RATIO}× {m2}×{k2}'s "
            f"on both frameworks — **{verdict}**.",
            "",
            f"`{TASK}`, {samples} samples per trial, under a {MEMORY_BUDGET} budget (`RLIMIT_DATA`; no wall near); "
            f"{rounds} round(s), every setting's workers up together and the settings taking turns; medians over "
            "the rounds. Peak above baseline is the trial's own reading (peak − the model and data in memory "
            "before training). Samples/s: the trial's own figure (steady-state windows), in its least disturbed round: "
            "on a 2-core machine shared with other work a trial's speed moves by tens of percent from round to "
            "round. What a setting costs is read better from CPU time, which another process's load stretches much "
            "less: the trial process's user and system seconds (the whole trial: build, training, evaluation; read "
            'from /proc while it runs), medians over the rounds, summed over the two configs; "CPU time vs glibc '
            "default\" is that sum over glibc default's (below 1: cheaper). System time is where a low mmap "
            "threshold shows: every large block is a fresh mapping, zero-filled page by page; the page faults "
            "(minor faults of the trial process, medians summed as CPU time is) count those pages, whatever the load, "
            "and huge pages (`glibc.malloc.hugetlb=1`, where the kernel's transparent_hugepage allows them) make "
            "them fewer. VmData peak − reading: the largest gap, over the trials, between "
            f"the trial process's `VmData` (sampled every {SAMPLE_SECONDS * 1000:.0f} ms from outside; what "
            "`RLIMIT_DATA` compares with the budget) and the trial's peak reading: a positive gap is address space "
            "the allocator holds that the reading does not see, and a wall measured under that setting would not "
            "hold under the same cap. Each setting's variables are in the workers' environment from the start of "
            "the interpreter, as `start_child` passes them on; `LD_PRELOAD` replaces glibc's malloc for the whole "
            "process, the frameworks' own allocations included.",
            "",
            "![memory](memory.png)",
            "",
            run.footer(),
        ]
    )


def plot(args, settings, results) -> None:
    figure, (ratio_axis, cost_axis) = new_figure(2, width=10, height=2.2 + 0.42 * len(settings))
    labels = [_short(label) for label, _ in settings]
    width = 0.38
    for offset, (framework, colour) in zip(
        (-width / 2, width / 2), (("torch", "tab:orange"), ("tensorflow", "tab:blue")), strict=True
    ):
        if framework not in results:
            continue
        summaries = [summary(results[framework][label]) for label, _ in settings]
        reference = summary(results[framework]["glibc default"])
        positions = [i + offset for i in range(len(settings))]
        bars = ratio_axis.barh(
            positions, [s["ratio"] or 0.0 for s in summaries], height=width, color=colour, label=framework
        )
        for bar, s in zip(bars, summaries, strict=True):
            if _unseen(s) - _unseen(reference) > UNSEEN_MARGIN:
                bar.set_hatch("///")
                bar.set_edgecolor("black")
        scale = reference["cpu"] or 1.0
        users = [(s["user"] or 0.0) / scale for s in summaries]
        systems = [(s["system"] or 0.0) / scale for s in summaries]
        cost_axis.barh(positions, users, height=width, color=colour, label=f"{framework}: user")
        cost_axis.barh(
            positions, systems, left=users, height=width, color=colour, alpha=0.45, label=f"{framework}: system"
        )
    ratio_axis.axvline(TARGET_RATIO, color="black", linestyle="--", linewidth=1, label=f"target ≤ {TARGET_RATIO}×")
    ratio_axis.barh([0], [0], color="white", edgecolor="black", hatch="///", label="VmData above the reading")
    (m1, k1), (m2, k2) = CONFIGS
    ratio_axis.set_xlabel(f"peak above baseline: {m1}×{k1} / {m2}×{k2}")
    cost_axis.axvline(1.0, color="grey", linewidth=0.8)
    cost_axis.set_xlabel("CPU seconds per pair of trials / glibc default's")
    for axis in (ratio_axis, cost_axis):
        axis.set_yticks(range(len(settings)), labels, fontsize=7)
        axis.invert_yaxis()
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    cost_axis.set_yticklabels([])
    ratio_axis.set_title(f"Micro-batching's memory saving ({TASK}, CPU)", fontsize=9)
    cost_axis.set_title("What it costs: CPU time (lower is cheaper)", fontsize=9)
    save_plot(figure, args.results, "memory")


def _unseen(summary_: dict) -> float:
    """The largest gap between the sampled VmData peak and the trial's reading, over both configs."""
    return max((summary_[config]["unseen"] or 0 for config in CONFIGS), default=0)


def _short(label: str) -> str:
    label = label.split(" (LD_PRELOAD")[0].replace("autobatch's default (", "autobatch: ").rstrip(")")
    label = label.replace("MALLOC_", "").replace("GLIBC_TUNABLES=glibc.malloc.hugetlb=1", "THP")
    return label.replace("=1048576", "=1 MiB").replace(" alone", "")


if __name__ == "__main__":
    sys.exit(main())
