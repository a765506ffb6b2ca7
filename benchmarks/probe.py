"""The memory wall: autobatch's probe against ground truth, Lightning and Accelerate, under one real cap.

    .venv/bin/python benchmarks/probe.py [--quick] [--budget SIZE] [--task synthetic-images]
    .venv/bin/python benchmarks/probe.py --task tiny-gpt2 --budget 2GiB

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
  that child is "the user's process", and every OOM it catches is counted. They train the
  task's own code: for an ``autobatch.TorchTask`` its model factory, ``Dataset``,
  ``collate_fn``, loss and optimizer factory (:class:`_Peer`); for a ``Workload`` its arrays
  with cross-entropy and Adam.

Each answer is then checked with a full trial in a fresh process under the full budget, and
autobatch's also with the search's largest accumulation (``SearchSpace().max_accumulation``
steps, whole windows): the search runs every config up to the wall at every accumulation, so
the wall must hold there too. Where a sample's size varies (sequences padded to the longest
in their batch), autobatch's trials train the longest samples first, so that check is the
worst batch of an epoch at each answer, and every answer is checked, the peers' too: they
found theirs on random batches, whose longest samples the table lists.

Writes ``results/probe.md`` and ``results/probe.png`` for ``synthetic-images``, and
``results/probe-<task>.md``/``.png`` for any other task.
"""

from __future__ import annotations

import json
import re
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

    from autobatch import MemoryBudget, load_task

    budget_bytes = MemoryBudget.parse(args.budget).resolve("cpu")
    reduced_bytes = int(budget_bytes * (1 - SAFETY_MARGIN))
    task = load_task(args.task)
    ceiling = task.n_train
    sizes = train_sample_sizes(task)

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

    # With sizes that vary, every answer is checked: the trial trains the longest samples first, so
    # this is the worst batch of an epoch at the size found, which a search on random batches may
    # not have met. Otherwise only answers near the wall need checking.
    print(
        "checking "
        + ("every answer on the longest samples" if sizes is not None else "answers above 97% of the true wall")
        + " with a full trial under the full budget ...",
        flush=True,
    )
    checked = {}
    for name, found in [("autobatch", ours["found"])] + [(n, t.get("found")) for n, t in tools.items()]:
        if found and (sizes is not None or found > 0.97 * truths["full"]["wall"]):
            checked[name] = fits(args.task, found, budget_bytes)[0]
            print(f"  {name} at {found}: {'fits' if checked[name] else 'does not fit'}", flush=True)
        elif found:
            checked[name] = "below"
    steps = max_accumulation()
    print(f"checking autobatch's wall at {steps} accumulation steps under the full budget ...", flush=True)
    accumulated = fits(args.task, ours["found"], budget_bytes, accumulation=steps)[1]
    print(f"  {ours['found']} x {steps}: {accumulated}", flush=True)

    text = render(run, ours, tools, truths, checked, accumulated, budget_bytes, reduced_bytes, ceiling, task, sizes)
    name = result_name(args.task)
    plot(args, ours, tools, truths, name)
    write_markdown(args.results, name, text)
    return 0


def result_name(task: str) -> str:
    """``probe`` for the default task (its published results keep their name), else ``probe-<task>``."""
    if task == "synthetic-images":
        return "probe"
    return "probe-" + re.sub(r"[^A-Za-z0-9]+", "-", task).strip("-").lower()


def train_sample_sizes(task):
    """Each training sample's size where memory depends on it (as autobatch's trials read it), else None."""
    from autobatch import TorchTask
    from autobatch.tasks.samples import is_array_pair, sample_sizes

    if not isinstance(task, TorchTask) or is_array_pair(task.train_data):
        return None
    data = task.train_data
    return sample_sizes(len(data), data.__getitem__, task.sample_size)


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
            max_trial_samples=probe_budget().train_samples,
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
    from autobatch import TrialConfig, load_task

    loaded = load_task(task)
    config = TrialConfig(micro_batch, accumulation, loaded.base_learning_rate)
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
    report: dict = {"tool": spec["tool"], "ooms": 0, "tried": [], "steps": []}
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


class _Peer:
    """What Lightning and Accelerate train: the task's own model, data, collate function, loss and optimizer.

    A :class:`~autobatch.TorchTask` gives the peers exactly what autobatch's trials get: its model
    factory, its ``Dataset`` read through ``DataLoader(collate_fn=task.collate_fn)``, its loss
    (``task.loss``, else the model's own ``outputs.loss`` for a dict batch, else cross-entropy) and
    its optimizer factory at the base learning rate. A ``Workload`` keeps what this benchmark
    always gave the peers: its arrays, cross-entropy and Adam. Where a sample's size can be told
    (``task.sample_size``, or a dict of sequences), each batch carries its longest sample's size,
    so the report says which batches each peer tried.
    """

    def __init__(self, task: str) -> None:
        import torch
        from torch.utils.data import default_collate

        from autobatch import TorchTask, load_task
        from autobatch.backends.torch import ArrayDataset
        from autobatch.tasks.samples import detect_sample_size, is_array_pair

        self.task = load_task(task)
        self.size_of = None
        if isinstance(self.task, TorchTask):
            data = self.task.train_data
            if is_array_pair(data):
                self.dataset, self.collate = ArrayDataset(*data), _as_is
            else:
                self.dataset, self.collate = data, self.task.collate_fn or default_collate
                self.size_of = self.task.sample_size or detect_sample_size(data[0])
            self.user_loss = self.task.loss or _default_loss
            self.make_optimizer = self.task.optimizer or _adam(torch)
            self.build_model = self.task.model
        else:  # a Workload: arrays, cross-entropy and Adam, as before TorchTasks
            self.dataset = ArrayDataset(self.task.x_train, self.task.y_train)
            self.collate = _as_is
            self.user_loss = _cross_entropy
            self.make_optimizer = _adam(torch)
            self.build_model = lambda: self.task.build_model("torch")

    def model(self):
        return self.build_model()

    def optimizer(self, parameters):
        return self.make_optimizer(parameters, self.task.base_learning_rate)

    def loader(self, batch_size: int):
        from torch.utils.data import DataLoader

        collate = self.collate if self.size_of is None else self._sized
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=True, collate_fn=collate)

    def _sized(self, samples: list):
        """The collated batch with its longest sample's size, which the training step records."""
        return max(self.size_of(sample) for sample in samples), self.collate(samples)

    def unpack(self, item) -> tuple[int | None, object]:
        """(the batch's longest sample, or None where sizes are not known; the batch as the collate made it)."""
        return item if self.size_of is not None else (None, item)

    def loss(self, model, batch):
        return self.user_loss(model, batch)


def _adam(torch):
    return lambda parameters, lr: torch.optim.Adam(parameters, lr=lr)


def _cross_entropy(model, batch):
    import torch

    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _default_loss(model, batch):
    """A TorchTask's loss when it names none: ``model(**batch).loss`` for a dict batch, else cross-entropy."""
    import torch

    if isinstance(batch, dict):
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise TypeError("the task names no loss and the model's output for a dict batch has no .loss")
        return loss
    x, y = batch
    output = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, (tuple, list)) else model(x)
    return torch.nn.functional.cross_entropy(output, y)


def _as_is(batch):
    return batch  # ArrayDataset.__getitems__ already returns (x, y) tensors for the whole batch


def _lightning_search(spec: dict, report: dict):
    import lightning.pytorch as pl
    import lightning.pytorch.tuner.batch_size_scaling as scaling
    from lightning.pytorch.tuner import Tuner

    peer = _Peer(spec["task"])
    recognised = scaling.is_oom_error
    tried: list[int] = report["tried"]
    steps: list[list] = report["steps"]

    def counting(exception: BaseException) -> bool:
        oom = recognised(exception)
        report["ooms"] += int(oom)
        return oom

    scaling.is_oom_error = counting  # every OOM the tuner catches happened in this process

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.model = peer.model()

        def training_step(self, item, index):
            longest, batch = peer.unpack(item)
            if index == 0:
                tried.append(self.batch_size)
            steps.append([self.batch_size, longest])  # before the step: an OOM in it is this batch's
            return peer.loss(self.model, batch)

        def configure_optimizers(self):
            return peer.optimizer(self.parameters())

        def train_dataloader(self):
            return peer.loader(self.batch_size)

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

    peer = _Peer(spec["task"])
    tried: list[int] = report["tried"]
    steps_seen: list[list] = report["steps"]

    @find_executable_batch_size(starting_batch_size=spec["ceiling"])
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        try:
            model = peer.model()
            model.train()
            optimizer = peer.optimizer(model.parameters())
            steps = 0
            while steps < STEPS_PER_TRY:  # a batch as large as the data set gives one step per epoch
                for item in peer.loader(batch_size):
                    longest, batch = peer.unpack(item)
                    steps_seen.append([batch_size, longest])
                    optimizer.zero_grad(set_to_none=True)
                    peer.loss(model, batch).backward()
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


def render(
    run: Run, ours, tools, truths, checked, accumulated, budget_bytes, reduced_bytes, ceiling, task, sizes
) -> str:
    args = run.args
    varies = sizes is not None
    longest = int(sizes.max()) if varies else None
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
    headers = [
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
        "full trial fits the budget" + (" (longest samples first)" if varies else ""),
        f"the search's largest accumulation (×{steps}) at the wall fits",
    ]
    align = "lrrrrrrrrrll"
    if varies:
        # Which batches the size found was measured on: autobatch's trials train the longest samples
        # first; the peers trained random batches, each padded to its own longest sample.
        worst = f"{longest} (longest first)"
        seen = [worst, worst, worst] + [_longest_seen(report) for report in tools.values()]
        for row, cell in zip(rows, seen, strict=True):
            row.insert(2, cell)
        headers.insert(2, f"longest sample in the batches at that size (data: {int(sizes.min())}–{longest})")
        align = "ll" + "l" + align[2:]
    table = markdown_table(headers, rows, align=align)
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
    if varies:
        holds = [("autobatch", ours["found"])] + [(labels[n].split(" (")[0], r.get("found")) for n, r in tools.items()]
        targets.append(
            "- the size found holds on the longest batch (a full trial at that micro-batch under the full budget, "
            "training the longest samples first): "
            + ", ".join(
                f"{label} {found}: {_yes(checked.get(key))}"
                for (label, found), key in zip(holds, ["autobatch", *tools], strict=True)
                if found
            )
        )
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
            *(_peer_notes(task, tools, sizes) if varies or _is_torch_task(task) else []),
            "",
            f"![probe]({result_name(args.task)}.png)",
            "",
            run.footer(),
        ]
    )


def plot(args, ours, tools, truths, name: str) -> None:
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
    save_plot(figure, args.results, name)


def _is_torch_task(task) -> bool:
    from autobatch import TorchTask

    return isinstance(task, TorchTask)


def _longest_seen(report: dict) -> str:
    """The longest sample of each batch a peer trained at the size it found (random batches)."""
    found = report.get("found")
    steps = [(size, longest) for size, longest in report.get("steps", []) if longest is not None]
    seen = [longest for size, longest in steps if size == found]
    if seen:
        return f"{max(seen)} (random batches: {', '.join(map(str, seen))})"
    # Lightning's binsearch returns its last success less its 5% margin, a size it never trained.
    above = sorted({size for size, _ in steps if found and size > found})
    if not found or not above:
        return "–"
    near = [longest for size, longest in steps if size == above[0]]
    return f"not trained at {found}; at {above[0]}: {', '.join(map(str, near))} (random batches)"


def _peer_notes(task, tools: dict, sizes) -> list[str]:
    """What the peers were given, and (sizes varying) which batches they trained at each size tried."""
    notes = []
    if _is_torch_task(task):
        collate = _callable_name(task.collate_fn) if task.collate_fn else "default_collate"
        loss = f"`{_callable_name(task.loss)}`" if task.loss else "the model's own `outputs.loss` for a dict batch"
        optimizer = _callable_name(task.optimizer) if task.optimizer else "Adam"
        notes.append(
            f"- Same training code for every method: Lightning and Accelerate train the task's own model factory "
            f"(`{_callable_name(task.model)}`), its `Dataset` through `DataLoader(collate_fn={collate})`, shuffled, "
            f"its loss ({loss}) and its optimizer factory (`{optimizer}`) at the "
            f"base learning rate {task.base_learning_rate:g}: the LightningModule's `training_step` returns that "
            "loss and `configure_optimizers` calls that factory; Accelerate's `find_executable_batch_size` wraps a "
            "plain loop of the same."
        )
    if sizes is not None:
        import numpy as np

        longest = int(sizes.max())
        at_most = int(np.sum(sizes >= longest - 1))
        notes.append(
            f"- Sample sizes: {int(sizes.min())}–{longest} (median {int(np.median(sizes))}); {at_most} of "
            f"{len(sizes)} training samples are within 1 of the longest. autobatch's trials (probe, ground truth, "
            "checks) train the longest samples first, so every size it reports was measured on the worst batch of "
            "an epoch; the peers train random batches, each padded to its own longest sample. The batches each "
            "peer trained (batch size: the longest sample of each step, in order; the last step of a try that ran "
            "out of memory is the batch it failed on): "
            + "; ".join(f"{name}: {_tries(report)}" for name, report in tools.items())
            + "."
        )
    return notes


def _tries(report: dict) -> str:
    groups: list[tuple[int, list]] = []
    for size, longest in report.get("steps", []):
        if groups and groups[-1][0] == size:
            groups[-1][1].append(longest)
        else:
            groups.append((size, [longest]))
    return ", ".join(f"{size}: {'/'.join(str(v) for v in values)}" for size, values in groups) or "none"


def _callable_name(function) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


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
