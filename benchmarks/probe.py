"""The memory wall: autobatch's probe against ground truth, Lightning and Accelerate, under one real cap.

    .venv/bin/python benchmarks/probe.py [--quick] [--budget SIZE] [--task synthetic-images]

The budget is 1GiB, or 768MiB with ``--quick`` (a lower wall: every try is cheaper).

Every method looks for the largest micro-batch of ``--task`` (PyTorch, CPU) that fits
``--budget``, enforced for real with ``RLIMIT_DATA``:

- autobatch: the probe of ``autobatch.tune`` itself (a one-trial study; its wall, probes
  and seconds are read from the study's ``autobatch_probe`` user attrs). It runs its
  probes in trial workers capped at the budget less the 5% safety margin.
- ground truth: bisection over the micro-batch with ``autobatch.run_trial``, one fresh
  process per probe, each a full trial (train, evaluate, train), under the margin-reduced
  cap and under the full budget. ``--quick`` starts the bracket at the probe's answer and
  gallops out from it; a full run bisects all of [1, training-set size] and then repeats
  the trials either side of the wall, since near it the same trial sometimes fits and
  sometimes does not.
- Lightning ``Tuner.scale_batch_size`` (power, binsearch; defaults: 3 steps per try, binsearch
  applies its own 5% margin) and Accelerate ``find_executable_batch_size`` (starting at the
  training-set size, 3 steps per try), each in a child process capped at the full budget:
  that child is "the user's process", and every OOM it catches is counted.

Each answer is then checked with a full trial in a fresh process under the full budget, and
autobatch's also with the search's largest accumulation (``SearchSpace().max_accumulation``
steps, whole windows): the search runs every config up to the wall at every accumulation, so
the wall must hold there too. Writes ``results/probe.md`` and ``results/probe.png``.
"""

from __future__ import annotations

import json
import resource
import subprocess
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

SAFETY_MARGIN = 0.05  # tune()'s default
STEPS_PER_TRY = 3  # Lightning's default steps_per_trial; Accelerate's tries do the same


def probe_budget():
    """What one probe trains: enough to reach the peak (Adam state, evaluation, training after it)."""
    from autobatch import TrialBudget

    return TrialBudget(train_samples=256, warmup_steps=1, min_timed_steps=1, val_samples=256)


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    if args.child:
        return child_main(Path(args.child))
    run = Run(args, "lightning", "accelerate")
    args.budget = args.budget or ("768MiB" if args.quick else "1GiB")

    from autobatch import MemoryBudget, load_workload

    budget_bytes = MemoryBudget.parse(args.budget).resolve("cpu")
    reduced_bytes = int(budget_bytes * (1 - SAFETY_MARGIN))
    workload = load_workload(args.task)
    ceiling = len(workload.x_train)

    print(f"autobatch probe on {args.task}, budget {args.budget} ...", flush=True)
    ours = autobatch_probe(args.task, args.budget)
    print(f"  wall {ours['found']} in {ours['seconds']:.1f} s ({len(ours['probes'])} probes)", flush=True)

    tools = {}
    for name in ("lightning-power", "lightning-binsearch", "accelerate"):
        print(f"{name} under RLIMIT_DATA={budget_bytes} ...", flush=True)
        tools[name] = run_capped_tool(name, args.task, budget_bytes, ceiling)
        print(f"  {tools[name]}", flush=True)

    truths = {}
    seed = ours["found"]
    for label, cap in (("reduced", reduced_bytes), ("full", budget_bytes)):
        print(f"ground truth under {cap} bytes (fresh processes) ...", flush=True)
        truths[label] = true_wall(args.task, cap, ceiling, seed=seed if args.quick else None)
        if not args.quick:
            truths[label]["repeats"] = repeat_edges(args.task, cap, truths[label]["wall"], ceiling)
        print(
            f"  {truths[label]['wall']} in {truths[label]['seconds']:.0f} s ({truths[label]['trials']} trials)",
            flush=True,
        )
        # The full budget leaves 5% more bytes, at the fitted bytes per sample: where to start looking.
        seed = truths[label]["wall"] + int(SAFETY_MARGIN * budget_bytes / max(ours["bytes_per_sample"], 1.0))

    print("checking answers above 97% of the true wall with a full trial under the full budget ...", flush=True)
    checked = {}
    for name, found in [("autobatch", ours["found"])] + [(n, t.get("found")) for n, t in tools.items()]:
        if found and found > 0.97 * truths["full"]["wall"]:
            checked[name] = fits(args.task, found, budget_bytes)[0]
        elif found:
            checked[name] = "below"
    steps = max_accumulation()
    print(f"checking autobatch's wall at {steps} accumulation steps under the full budget ...", flush=True)
    accumulated = fits(args.task, ours["found"], budget_bytes, accumulation=steps)[1]
    print(f"  {ours['found']} x {steps}: {accumulated}", flush=True)

    text = render(run, ours, tools, truths, checked, accumulated, budget_bytes, reduced_bytes, ceiling)
    plot(args, ours, tools, truths)
    write_markdown(args.results, "probe", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--task", default="synthetic-images")
    parser.add_argument(
        "--budget", default=None, help="the memory budget (RLIMIT_DATA on the CPU); default 1GiB, 768MiB with --quick"
    )
    parser.add_argument("--child", default=None, help="(internal) run one capped tool from this spec file")


# --- autobatch's probe, exactly as tune() runs it ---------------------------------------------


def autobatch_probe(task: str, budget: str) -> dict:
    """Run ``tune(n_trials=1)`` on a throwaway storage and read back its probe."""
    import autobatch
    from autobatch.search.probe import MemoryModel

    start_up = []  # per probe: worker start + framework import + task load (the first probe pays them)

    baselines = []

    def on_probe(micro_batch, result) -> None:
        if result.baseline_memory_bytes:
            baselines.append(result.baseline_memory_bytes)
        start_up.append(sum(result.timings.get(k, 0.0) for k in ("worker_start", "framework_import", "task_load")))

    with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as folder:
        started = time.perf_counter()
        result = autobatch.tune(
            task,
            "torch",
            memory_budget=budget,
            n_trials=1,
            storage=f"sqlite:///{folder}/probe.db",
            study_name="probe-benchmark",
            safety_margin=SAFETY_MARGIN,
            trial_budget=probe_budget(),
            device="cpu",
            on_probe=on_probe,
        )
        tune_seconds = time.perf_counter() - started
        probe = result.study.user_attrs["autobatch_probe"]
    model = MemoryModel.from_dict(probe["memory_model"])
    return {
        "found": int(probe["max_micro_batch"]),
        "seconds": float(probe["seconds"]),
        "tune_seconds": tune_seconds,
        "start_up_seconds": sum(start_up),
        "baseline_bytes": min(baselines) if baselines else None,
        "probes": probe["probes"],
        "ooms_in_workers": sum(1 for p in probe["probes"] if p["status"] != "ok"),
        "bytes_per_sample": model.bytes_per_sample,
    }


# --- ground truth: bisection, one fresh process per probe ---------------------------------------


def fits(task: str, micro_batch: int, cap_bytes: int, accumulation: int = 1) -> tuple[bool, str]:
    """A full trial at ``micro_batch`` in a fresh process under ``cap_bytes``: did it run to the end?

    With ``accumulation`` steps it trains whole windows (the probe's budget, each window
    ``micro_batch × accumulation`` samples), so every step of the accumulation is held.
    """
    import dataclasses

    import autobatch
    from autobatch import TrialConfig, load_workload

    workload = load_workload(task)
    config = TrialConfig(micro_batch, accumulation, workload.base_learning_rate)
    budget = probe_budget()
    if accumulation > 1:
        budget = dataclasses.replace(budget, train_samples=max(budget.train_samples, config.effective_batch_size))
    result = autobatch.run_trial(task, "torch", config, memory_budget=cap_bytes, budget=budget, device="cpu")
    return result.status == "ok", result.status


def max_accumulation() -> int:
    """The largest accumulation tune()'s default search space tries."""
    from autobatch import SearchSpace

    return SearchSpace().max_accumulation


def true_wall(task: str, cap_bytes: int, ceiling: int, seed: int | None = None) -> dict:
    """The largest micro-batch in [1, ceiling] whose full trial fits ``cap_bytes``.

    Assumes only that fitting is monotone in the micro-batch. Without ``seed`` it bisects
    [1, ceiling]; with one it gallops out from ``seed`` to a bracket, then bisects it.
    """
    started = time.perf_counter()
    outcomes: dict[int, str] = {}

    def check(m: int) -> bool:
        ok, status = fits(task, m, cap_bytes)
        outcomes[m] = status
        return ok

    if seed is None:
        low, high = 0, ceiling + 1  # low fits (0 trivially), high does not (past the ceiling)
    else:
        seed = max(1, min(seed, ceiling))
        step = max(1, seed // 100)
        if check(seed):
            low, high = seed, None
            while high is None:
                probe = min(ceiling + 1, low + step)
                if probe > ceiling:
                    high = ceiling + 1
                elif check(probe):
                    low, step = probe, step * 2
                else:
                    high = probe
        else:
            low, high = None, seed
            while low is None:
                probe = max(0, high - step)
                if probe == 0 or check(probe):
                    low = probe
                else:
                    high, step = probe, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if check(middle):
            low = middle
        else:
            high = middle
    return {
        "wall": low,
        "lowest_failure": high,
        "seconds": time.perf_counter() - started,
        "trials": len(outcomes),
        "outcomes": dict(sorted(outcomes.items())),
    }


def repeat_edges(task: str, cap_bytes: int, wall: int, ceiling: int, times: int = 2) -> dict:
    """Run the wall and the micro-batch above it ``times`` more: how often does each fit?"""
    repeats = {}
    for micro_batch in (wall, wall + 1):
        if 1 <= micro_batch <= ceiling:
            repeats[micro_batch] = sum(fits(task, micro_batch, cap_bytes)[0] for _ in range(times))
    return {"times": times, "passed": repeats}


# --- Lightning and Accelerate, each in a capped child process -----------------------------------


def run_capped_tool(tool: str, task: str, cap_bytes: int, ceiling: int, timeout: float = 900) -> dict:
    """Run ``tool`` in ``python probe.py --child`` under ``RLIMIT_DATA = cap_bytes``; its report as a dict."""
    with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as folder:
        spec = {"tool": tool, "task": task, "ceiling": ceiling, "report": f"{folder}/report.json", "workdir": folder}
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec))

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

        started = time.perf_counter()
        try:
            completed = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                preexec_fn=cap,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            code, log = completed.returncode, completed.stdout + completed.stderr
        except subprocess.TimeoutExpired as expired:
            code, log = "timeout", str(expired.stderr or "")
        process_seconds = time.perf_counter() - started
        try:
            report = json.loads(Path(spec["report"]).read_text())
        except (OSError, ValueError):
            lines = [line for line in log.strip().splitlines() if line.strip()]
            report = {
                "error": f"the process ended ({code}) without a report: {lines[-1][:300] if lines else 'no output'}"
            }
    report["process_seconds"] = process_seconds
    return report


def child_main(spec_path: Path) -> int:
    """Inside the capped child: import the tool, run it, write a report (also when it fails)."""
    spec = json.loads(spec_path.read_text())
    report: dict = {"tool": spec["tool"], "ooms": 0, "tried": []}
    try:
        started = time.perf_counter()
        if spec["tool"].startswith("lightning"):
            run = _lightning_search(spec, report)
        else:
            run = _accelerate_search(spec, report)
        report["import_seconds"] = time.perf_counter() - started
        report["data_bytes_before"] = _data_segment_bytes()
        started = time.perf_counter()
        report["found"] = run()
        report["seconds"] = time.perf_counter() - started
    except BaseException as error:  # noqa: BLE001 - the report says what happened
        report["seconds_to_failure"] = time.perf_counter() - started
        report["error"] = (
            f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
        )
        if _is_cpu_oom(error):
            # An out-of-memory error the tool did not recognise (oneDNN's "could not create a
            # primitive"): it crashed the user's process, which is one more OOM there.
            report["ooms"] += 1
            report["crashed_on_oom"] = True
    Path(spec["report"]).write_text(json.dumps(report))
    return 0


def _is_cpu_oom(error: BaseException) -> bool:
    from autobatch.backends.torch import TorchBackend

    return TorchBackend().is_oom(error)


def _data_segment_bytes() -> int | None:
    """VmData: what RLIMIT_DATA counts."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _training_data(task: str):
    import torch
    from torch.utils.data import DataLoader

    from autobatch import load_workload
    from autobatch.backends.torch import ArrayDataset

    workload = load_workload(task)
    dataset = ArrayDataset(workload.x_train, workload.y_train)

    def loader(batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=_as_is)

    return workload, loader, torch


def _as_is(batch):
    return batch  # ArrayDataset.__getitems__ already returns (x, y) tensors for the whole batch


def _lightning_search(spec: dict, report: dict):
    import lightning.pytorch as pl
    import lightning.pytorch.tuner.batch_size_scaling as scaling
    from lightning.pytorch.tuner import Tuner

    workload, loader, torch = _training_data(spec["task"])
    recognised = scaling.is_oom_error
    tried: list[int] = report["tried"]

    def counting(exception: BaseException) -> bool:
        oom = recognised(exception)
        report["ooms"] += int(oom)
        return oom

    scaling.is_oom_error = counting  # every OOM the tuner catches happened in this process

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.model = workload.build_model("torch")

        def training_step(self, batch, index):
            if index == 0:
                tried.append(self.batch_size)
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=workload.base_learning_rate)

        def train_dataloader(self):
            return loader(self.batch_size)

    def run() -> int:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1000,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=spec["workdir"],
        )
        mode = spec["tool"].split("-", 1)[1]
        found = Tuner(trainer).scale_batch_size(Module(), mode=mode, steps_per_trial=STEPS_PER_TRY, init_val=2)
        return int(found)

    return run


def _accelerate_search(spec: dict, report: dict):
    from accelerate.utils import find_executable_batch_size
    from accelerate.utils.memory import should_reduce_batch_size

    workload, loader, torch = _training_data(spec["task"])
    tried: list[int] = report["tried"]

    @find_executable_batch_size(starting_batch_size=spec["ceiling"])
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        try:
            model = workload.build_model("torch")
            optimizer = torch.optim.Adam(model.parameters(), lr=workload.base_learning_rate)
            steps = 0
            while steps < STEPS_PER_TRY:  # a batch as large as the data set gives one step per epoch
                for x, y in loader(batch_size):
                    optimizer.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    optimizer.step()
                    steps += 1
                    if steps == STEPS_PER_TRY:
                        break
            return batch_size
        except Exception as error:
            report["ooms"] += int(should_reduce_batch_size(error))
            raise

    def run() -> int:
        return int(train())

    return run


# --- the table --------------------------------------------------------------------------------


def render(run: Run, ours, tools, truths, checked, accumulated, budget_bytes, reduced_bytes, ceiling) -> str:
    args = run.args
    steps = max_accumulation()
    full, reduced = truths["full"]["wall"], truths["reduced"]["wall"]
    gib = 2**30
    rows = [
        [
            "autobatch probe (tune's, 5% margin)",
            f"{reduced_bytes / gib:.3f} GiB",
            ours["found"],
            reduced,
            _ratio(ours["found"], reduced),
            _ratio(ours["found"], full),
            f"{ours['seconds']:.1f}",
            f"{len(ours['probes'])} trials",
            "0",
            ours["ooms_in_workers"],
            _yes(checked.get("autobatch")),
            "yes" if accumulated == "ok" else f"**no** ({accumulated})",
        ],
        [
            "ground truth, bisection (fresh processes)",
            f"{reduced_bytes / gib:.3f} GiB",
            reduced,
            reduced,
            "1.000",
            _ratio(reduced, full),
            f"{truths['reduced']['seconds']:.0f}",
            f"{truths['reduced']['trials']} trials",
            "0",
            sum(1 for s in truths["reduced"]["outcomes"].values() if s != "ok"),
            "–",
            "–",
        ],
        [
            "ground truth, bisection (fresh processes)",
            f"{budget_bytes / gib:.3f} GiB",
            full,
            full,
            _ratio(full, reduced),
            "1.000",
            f"{truths['full']['seconds']:.0f}",
            f"{truths['full']['trials']} trials",
            "0",
            sum(1 for s in truths["full"]["outcomes"].values() if s != "ok"),
            "–",
            "–",
        ],
    ]
    labels = {
        "lightning-power": "Lightning scale_batch_size, power",
        "lightning-binsearch": "Lightning scale_batch_size, binsearch (its 5% margin)",
        "accelerate": f"Accelerate find_executable_batch_size (from {ceiling}, ×0.9)",
    }
    for name, report in tools.items():
        found = report.get("found")
        rows.append(
            [
                labels[name],
                f"{budget_bytes / gib:.3f} GiB",
                found if found else f"failed: {report.get('error', '?')}",
                full,
                _ratio(found, reduced),
                _ratio(found, full),
                f"{report['seconds']:.1f}" if "seconds" in report else "–",
                f"{len(report.get('tried', []))} tries",
                oom_cell(report),
                "–",
                _yes(checked.get(name)),
                "–",  # these tools do not accumulate
            ]
        )
    table = markdown_table(
        [
            "method",
            "cap (RLIMIT_DATA)",
            "micro-batch found",
            "true wall, same cap",
            "found / true (95% cap)",
            "found / true (full budget)",
            "seconds",
            "work",
            "OOMs in user's process",
            "OOMs in workers",
            "full trial fits the budget",
            f"the search's largest accumulation (×{steps}) at the wall fits",
        ],
        rows,
        align="lrrrrrrrrrll",
    )
    binsearch = tools.get("lightning-binsearch", {})
    ratio = ours["found"] / reduced if reduced else float("nan")
    speed = ours["seconds"] / binsearch["seconds"] if binsearch.get("seconds") else float("nan")
    targets = [
        f"- found/true ≥ 0.97 (against the bisection under the same margin-reduced cap): "
        f"{ratio:.3f} — **{'met' if ratio >= 0.97 else 'not met'}**"
        + (" (above 1: the probe's answer exceeds the truth)" if ratio > 1 else ""),
        (
            f"- seconds ≤ 0.5 × Lightning binsearch: {ours['seconds']:.1f} s vs {binsearch['seconds']:.1f} s "
            f"= {speed:.2f}× — **{'met' if speed <= 0.5 else 'not met'}**"
            if binsearch.get("seconds")
            else f"- seconds ≤ 0.5 × Lightning binsearch: not measured, Lightning binsearch failed "
            f"({binsearch.get('error', 'no result')}); autobatch took {ours['seconds']:.1f} s"
        ),
        "- zero OOMs in the user's process: autobatch 0 (its probes run in trial workers) — **met**; "
        + ", ".join(f"{labels[n].split(' (')[0]} {oom_cell(r)}" for n, r in tools.items()),
        f"- the wall holds at the search's largest accumulation: micro-batch {ours['found']} × {steps} steps under "
        f"the full budget: {accumulated} — **{'met' if accumulated == 'ok' else 'not met'}**",
    ]
    tool_times = "; ".join(
        f"{name}: search {r.get('seconds', r.get('seconds_to_failure', float('nan'))):.1f} s, child process "
        f"{r['process_seconds']:.1f} s (imports {r.get('import_seconds', float('nan')):.1f} s), data segment "
        f"{(r.get('data_bytes_before') or 0) / 2**20:.0f} MiB before the search, sizes tried {r.get('tried', [])}"
        + (f", error: {r['error']}" if r.get("error") else "")
        for name, r in tools.items()
    )
    probes = ", ".join(
        f"{p['micro_batch']}{'×' + str(p['accumulation_steps']) if p.get('accumulation_steps', 1) > 1 else ''}:{p['status']}"
        for p in ours["probes"]
    )
    truth_detail = "; ".join(
        f"{label} cap: " + ", ".join(f"{m}:{s}" for m, s in t["outcomes"].items()) for label, t in truths.items()
    )
    return "\n".join(
        [
            f"# Memory wall: {args.task} (PyTorch, CPU), budget {args.budget}",
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
            f"- autobatch: seconds are the probe phase of `tune()`, its trial worker's start included "
            f"({ours['start_up_seconds']:.1f} s of worker start, PyTorch import and task load, paid once); the whole "
            f"one-trial `tune()` call took {ours['tune_seconds']:.1f} s. Probes (micro-batch:status; ×{steps}: the "
            f"wall confirmed at the search's largest accumulation, under the same cap): {probes}.",
            f"- The accumulation column: a trial at the wall with {steps} steps, in a fresh process under the full "
            f"budget, trained in whole windows of {ours['found'] * steps} samples (then evaluated, then one more "
            "window), as the search runs that config.",
            f"- Every probe and ground-truth trial is a full trial ({probe_budget().train_samples} samples trained, "
            f"evaluation on {probe_budget().val_samples} validation samples, then one more window at the full "
            "micro-batch) at the task's base learning rate; Lightning and Accelerate train "
            f"{STEPS_PER_TRY} steps per try, no evaluation, in a process that also holds Lightning/Accelerate. "
            "Their seconds are the search call alone (imports excluded); the last column checks their answer with "
            "a full trial in a fresh process under the full budget.",
            f"- Lightning and Accelerate: {tool_times}. For comparison, autobatch's trial process holds "
            f"{(ours['baseline_bytes'] or 0) / 2**20:.0f} MiB of data segment with the model built, before training: "
            "a tool that searches inside the user's process has that process's own footprint to fit beside the batch.",
            f"- Ground truth (micro-batch:status): {truth_detail}"
            + (
                " (bracket seeded at the probe's answer, --quick)."
                if args.quick
                else " (bisection of [1, training-set size])."
            ),
            *_repeat_notes(truths),
            "",
            "![probe](probe.png)",
            "",
            run.footer(),
        ]
    )


def plot(args, ours, tools, truths) -> None:
    """How close each method got to the true wall (full budget), and what it cost."""
    figure, (left, right) = new_figure(2, width=11, height=3.8)
    short = {
        "lightning-power": "Lightning power",
        "lightning-binsearch": "Lightning binsearch",
        "accelerate": "Accelerate",
    }
    names = ["autobatch probe"] + [short[n] for n in tools]
    found = [ours["found"]] + [t.get("found") or 0 for t in tools.values()]
    seconds = [ours["seconds"]] + [t.get("seconds", t.get("seconds_to_failure", 0.0)) for t in tools.values()]
    ooms = ["0"] + [oom_cell(t) for t in tools.values()]
    colours = ["tab:green"] + ["tab:grey"] * len(tools)
    full = truths["full"]["wall"]
    left.barh(range(len(names)), [f / full for f in found], color=colours)
    left.axvline(1.0, color="black", linewidth=1, label=f"true wall, full budget ({full})")
    left.axvline(
        truths["reduced"]["wall"] / full,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"true wall, 5% margin ({truths['reduced']['wall']})",
    )
    left.set_yticks(range(len(names)), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("micro-batch found / true wall")
    left.set_title(f"{args.task}, budget {args.budget}", fontsize=10)
    left.legend(fontsize=7, loc="lower right")
    right.barh(range(len(names)), seconds, color=colours)
    for row, (value, count) in enumerate(zip(seconds, ooms, strict=True)):
        right.text(value, row, f"  {count} OOM(s) in the user's process", va="center", fontsize=7)
    right.set_yticks(range(len(names)), [""] * len(names))
    right.invert_yaxis()
    right.set_xlim(0, max(seconds) * 1.9)
    right.set_xlabel("seconds of search")
    right.set_title("cost", fontsize=10)
    save_plot(figure, args.results, "probe")


def _repeat_notes(truths: dict) -> list[str]:
    notes = []
    for label, truth in truths.items():
        if "repeats" in truth:
            times = truth["repeats"]["times"]
            passed = ", ".join(f"{m}: {n}/{times} fit" for m, n in truth["repeats"]["passed"].items())
            notes.append(f"- Repeated in fresh processes at the edge of the {label}-cap wall: {passed}.")
    return notes


def oom_cell(report: dict) -> str:
    """OOMs in the tool's (the user's) process; "(crashed)" when the last one was not recognised."""
    count = report.get("ooms", "?")
    return f"{count} (crashed)" if report.get("crashed_on_oom") else str(count)


def _ratio(found, true) -> str:
    return f"{found / true:.3f}" if found and true else "–"


def _yes(value) -> str:
    if value == "below":
        return "below the true wall (not run)"
    return "–" if value is None else ("yes" if value else "**no**")


if __name__ == "__main__":
    sys.exit(main())
