"""The memory wall: autobatch's probe against a minimal training loop's and Lightning's, under one real cap.

    .venv/bin/python benchmarks/probe.py [--quick] [--workloads synthetic-images,residual-mlp]

Two workloads of different shapes, each on PyTorch and TensorFlow (the same architecture in
both), each under one memory budget enforced for real with ``RLIMIT_DATA`` (CPU):

- ``synthetic-images``: a 4-conv CNN on 3×64×64 images (the ready-made study), budget 768MiB;
- ``residual-mlp`` (:func:`residual_mlp`, defined here): an MLP of 8 residual blocks
  64 → 2048 → 64 on 64 features, budget 640MiB.

For each workload and framework:

- autobatch: the probe phase of ``autobatch.tune`` itself (tune's default trial budget and
  search space; its wall, probes and seconds read back from the study's ``autobatch_probe``
  user attrs, the confirmation at the search's largest accumulation included). Its probes run
  in trial workers capped at the budget less the 5% safety margin.
- the true wall: the largest micro-batch at which a **minimal training loop** of the same
  model runs, bisected with one fresh process per try: the task's model, data and loss, Adam
  at the base learning rate, :data:`LOOP_STEPS` optimizer steps, no evaluation; PyTorch a plain
  ``zero_grad / loss.backward() / step``, TensorFlow a ``tf.function`` GradientTape step with
  ``keras.optimizers.Adam``. Each process enters as autobatch's trial children do
  (``autobatch.process.child.enter_child``: ``RLIMIT_DATA`` before any framework import, and
  the same allocator setting), under the margin-reduced cap (what the probe is held to) and
  under the full budget. Fitting is assumed monotone in the micro-batch: the bracket starts at
  the largest size the probe saw fit at one step, gallops out and is bisected to
  :data:`TRUTH_PRECISION` of the wall. tune() claims its wall at the largest accumulation its
  search tries (8 by default), so the minimal loop is bisected there too, under the reduced cap:
  the same loop accumulating that many micro-batches per optimizer step (PyTorch: ``backward()``
  into the same ``.grad`` buffers; TensorFlow: Keras's own ``gradient_accumulation_steps``).
- Lightning ``Tuner.scale_batch_size(mode="binsearch")`` (3 steps per try, its own 5% margin)
  on the workload's **PyTorch** model, in a child process capped at the full budget (the user's
  process: every OOM it catches is counted). Lightning has no TensorFlow: TensorFlow's probe
  seconds are compared with Lightning's binsearch on the PyTorch twin of the same model.
  ``--peers`` adds Lightning's power mode and Accelerate ``find_executable_batch_size``.

autobatch's answer, and Lightning's where it is within 3% of the true wall, is then checked
with a full trial (the confirmation's budget at accumulation 1: tune's default samples and the
whole validation split) in a fresh process under the full budget.

``--quick`` runs ``synthetic-images`` only, without the full-budget truth and
the checks; it writes under ``results/quick/``. Writes ``results/probe.md`` and ``results/probe.png``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WALL_SEARCH_EFFECTIVE_BATCH,
    Run,
    markdown_table,
    new_figure,
    parse_args,
    save_plot,
    write_markdown,
)

SAFETY_MARGIN = 0.05  # tune()'s default
STEPS_PER_TRY = 3  # Lightning's default steps_per_trial; Accelerate's tries do the same
#: optimizer steps of the minimal loop: the first builds Adam's state, the others run with it
LOOP_STEPS = 3
#: the true wall is bisected until the bracket is this share of it (or 1 sample)
TRUTH_PRECISION = 0.005
#: where the bracket's first step out from the probe's answer goes, as a share of it
TRUTH_FIRST_STEP = 0.02
FRAMEWORKS = ("torch", "tensorflow")
#: workload name -> (task path, budget of the full run, budget with --quick)
WORKLOADS = {
    "synthetic-images": ("synthetic-images", "768MiB", "768MiB"),
    "residual-mlp": ("probe:residual_mlp", "640MiB", "640MiB"),
}
QUICK_WORKLOADS = ("synthetic-images",)
#: seconds after which a probe trial is stopped (see autobatch_probe)
TRIAL_TIMEOUT = 180.0
FOUND_TARGET = 0.97
SPEED_TARGET = 0.5


def main(argv=None) -> int:
    args = parse_args(__doc__, _options, argv)
    if args.child:
        return child_main(Path(args.child))
    if args.loop:
        return loop_main(json.loads(args.loop))
    run = Run(args, "lightning", "accelerate")
    names = args.workloads.split(",") if args.workloads else list(QUICK_WORKLOADS if args.quick else WORKLOADS)
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; allowed: {sorted(WORKLOADS)}")
    peers = ["lightning-binsearch"] + (["lightning-power", "accelerate"] if args.peers else [])
    cases = [measure_workload(name, args, peers) for name in names]
    text = render(run, cases, peers)
    plot(args, cases)
    write_markdown(args.results, "probe", text)
    return 0


def _options(parser) -> None:
    parser.add_argument("--workloads", default=None, help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--peers", action="store_true", help="also Lightning's power mode and Accelerate")
    parser.add_argument("--child", default=None, help="(internal) run one capped tool from this spec file")
    parser.add_argument("--loop", default=None, help="(internal) one minimal training loop, as JSON")


def measure_workload(name: str, args, peers: list[str]) -> dict:
    """Every method on one workload: autobatch and the truths per framework, the peers on PyTorch."""
    from autobatch import MemoryBudget, load_task

    task, full_budget, quick_budget = WORKLOADS[name]
    budget = quick_budget if args.quick else full_budget
    budget_bytes = MemoryBudget.parse(budget).resolve("cpu")
    reduced_bytes = int(budget_bytes * (1 - SAFETY_MARGIN))
    ceiling = load_task(task).n_train
    case: dict = {"name": name, "task": task, "budget": budget, "budget_bytes": budget_bytes}
    case.update(reduced_bytes=reduced_bytes, ceiling=ceiling, frameworks={}, peers={})
    for framework in FRAMEWORKS:
        print(f"{name}, {framework}: autobatch probe under {budget} ...", flush=True)
        ours = autobatch_probe(task, framework, budget)
        print(f"  wall {ours['found']} in {ours['seconds']:.1f} s ({len(ours['probes'])} probes)", flush=True)
        truths = {}
        print(f"  minimal loop under the 95% cap ({reduced_bytes} bytes) ...", flush=True)
        # Seeded where the probe's single-step probes left the wall, before any confirmation lowered it.
        seed = max([ours["found"]] + [p["micro_batch"] for p in ours["probes"] if _single_step_fit(p)])
        truths["reduced"] = true_wall(task, framework, reduced_bytes, ceiling, seed=seed)
        print(f"    {truths['reduced']['wall']} ({truths['reduced']['trials']} processes)", flush=True)
        if ours["accumulation_steps"] > 1:
            steps = ours["accumulation_steps"]
            print(f"  minimal loop x{steps} under the 95% cap ...", flush=True)
            truths["accumulated"] = true_wall(
                task, framework, reduced_bytes, ceiling, ours["found"], accumulation=steps
            )
            truths["accumulated"]["accumulation_steps"] = steps
            print(f"    {truths['accumulated']['wall']} ({truths['accumulated']['trials']} processes)", flush=True)
        checked = None
        if not args.quick:
            # The full budget leaves 5% more bytes, at the fitted bytes per sample: where to start looking.
            extra = SAFETY_MARGIN * budget_bytes / max(ours["bytes_per_sample"], 1.0)
            seed = truths["reduced"]["wall"] + int(extra)
            print(f"  minimal loop under the full budget ({budget_bytes} bytes) ...", flush=True)
            known = truths["reduced"]["wall"]
            truths["full"] = true_wall(task, framework, budget_bytes, ceiling, seed=seed, known_fit=known)
            print(f"    {truths['full']['wall']} ({truths['full']['trials']} processes)", flush=True)
            checked = full_trial_fits(task, framework, ours["found"], budget_bytes)
            print(f"  full trial at {ours['found']} under the full budget: {checked}", flush=True)
        case["frameworks"][framework] = {"ours": ours, "truths": truths, "checked": checked}
    torch_truth = case["frameworks"]["torch"]["truths"]
    for peer in peers:
        print(f"{name}: {peer} (PyTorch) under RLIMIT_DATA={budget_bytes} ...", flush=True)
        report = run_capped_tool(peer, task, budget_bytes, ceiling)
        found = report.get("found")
        if "full" in torch_truth and found:
            near = found >= FOUND_TARGET * torch_truth["full"]["wall"]
            report["checked"] = full_trial_fits(task, "torch", found, budget_bytes) if near else "below"
        print(f"  {_peer_summary(report)}", flush=True)
        case["peers"][peer] = report
    return case


# --- the second workload: a residual MLP, the same in PyTorch and Keras ---------------------------

MLP_FEATURES, MLP_WIDTH, MLP_HIDDEN, MLP_BLOCKS, MLP_CLASSES = 64, 64, 2048, 8, 10
MLP_TRAIN, MLP_VAL = 8192, 512


def residual_mlp():
    """An MLP whose activations, not its weights, fill the budget: 8 blocks ``x + W2 relu(W1 x)``, 64 → 2048 → 64.

    Each block keeps 2048 activations per sample for its backward pass and costs little
    compute per byte held (a 64-wide input), so the wall is thousands of samples while a step
    at the wall stays about a second. The data: 10 Gaussian clusters in 64 dimensions.
    """
    from autobatch import Workload

    x_train, y_train, x_val, y_val = _mlp_split()
    return Workload(
        name="residual-mlp",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        models={"torch": "probe:torch_residual_mlp", "tensorflow": "probe:keras_residual_mlp"},
        base_batch_size=32,
        base_learning_rate=1e-3,
        description=f"residual MLP, {MLP_BLOCKS} blocks {MLP_WIDTH}-{MLP_HIDDEN}-{MLP_WIDTH}, {MLP_FEATURES} features",
    )


@lru_cache(maxsize=1)
def _mlp_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(MLP_CLASSES, MLP_FEATURES)).astype(np.float32)
    labels = rng.integers(0, MLP_CLASSES, size=MLP_TRAIN + MLP_VAL).astype(np.int64)
    features = (centres[labels] + 1.5 * rng.normal(size=(len(labels), MLP_FEATURES))).astype(np.float32)
    return features[:MLP_TRAIN], labels[:MLP_TRAIN], features[MLP_TRAIN:], labels[MLP_TRAIN:]


def torch_residual_mlp():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.project = nn.Linear(MLP_WIDTH, MLP_HIDDEN), nn.Linear(MLP_HIDDEN, MLP_WIDTH)

        def forward(self, x):
            return x + self.project(torch.relu(self.expand(x)))

    blocks = [Block() for _ in range(MLP_BLOCKS)]
    return nn.Sequential(nn.Linear(MLP_FEATURES, MLP_WIDTH), *blocks, nn.Linear(MLP_WIDTH, MLP_CLASSES))


def keras_residual_mlp():
    import keras
    from keras import layers

    inputs = keras.Input(shape=(MLP_FEATURES,), name="features")
    x = layers.Dense(MLP_WIDTH)(inputs)
    for _ in range(MLP_BLOCKS):
        x = layers.Add()([x, layers.Dense(MLP_WIDTH)(layers.Dense(MLP_HIDDEN, activation="relu")(x))])
    return keras.Model(inputs, layers.Dense(MLP_CLASSES)(x), name="residual_mlp")


# --- autobatch's probe, exactly as tune() runs it ---------------------------------------------


def autobatch_probe(task: str, framework: str, budget: str) -> dict:
    """Run ``tune()`` on a throwaway storage, stopping before the search's first trial; read back its probe."""
    import autobatch
    from autobatch.search.probe import MemoryModel

    seen: list[dict] = []  # per probe, what the worker said it spent

    def on_probe(micro_batch, result) -> None:
        seen.append({"baseline": result.baseline_memory_bytes, "timings": dict(result.timings)})

    with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as folder:
        started = time.perf_counter()
        result = autobatch.tune(
            task,
            framework,
            memory_budget=budget,
            n_trials=None,
            timeout=1e-9,  # the search stops before its first trial: the probe is all this measures
            storage=f"sqlite:///{folder}/probe.db",
            study_name="probe-benchmark",
            safety_margin=SAFETY_MARGIN,
            device="cpu",
            # A TensorFlow trial at the cap has hung (every thread in a futex wait, data segment at the
            # cap): it then counts as a failed probe, where tune()'s default (no limit) would wait forever.
            trial_timeout=TRIAL_TIMEOUT,
            on_probe=on_probe,
            # The wall itself, confirmed at the largest accumulation, whatever the 1-epoch horizon would search.
            search_space=autobatch.SearchSpace(max_effective_batch=WALL_SEARCH_EFFECTIVE_BATCH),
        )
        tune_seconds = time.perf_counter() - started
        probe = result.study.user_attrs["autobatch_probe"]
    for record, worker in zip(probe["probes"], seen, strict=False):
        record["timings"] = worker["timings"]
    baselines = [s["baseline"] for s in seen if s["baseline"]]
    return {
        "found": int(probe["max_micro_batch"]),
        "seconds": float(probe["seconds"]),
        "tune_seconds": tune_seconds,
        "accumulation_steps": int(probe.get("accumulation_steps", 1)),
        "baseline_bytes": min(baselines) if baselines else None,
        "probes": probe["probes"],
        "ooms_in_workers": sum(1 for p in probe["probes"] if p["status"] != "ok"),
        "bytes_per_sample": MemoryModel.from_dict(probe["memory_model"]).bytes_per_sample,
    }


def _single_step_fit(probe: dict) -> bool:
    return probe["status"] == "ok" and probe.get("accumulation_steps", 1) == 1


def full_trial_fits(task: str, framework: str, micro_batch: int, cap_bytes: int) -> str:
    """A full trial at ``micro_batch`` (the confirmation's budget, accumulation 1) in a fresh process: its status."""
    import autobatch
    from autobatch import TrialBudget, TrialConfig, load_task
    from autobatch.search.probe import probe_budget

    config = TrialConfig(micro_batch, 1, load_task(task).base_learning_rate)
    budget = probe_budget(TrialBudget(), config, full=True)
    return autobatch.run_trial(task, framework, config, memory_budget=cap_bytes, budget=budget, device="cpu").status


# --- the true wall: a minimal training loop, bisected, one fresh process per try ------------------


def true_wall(
    task: str,
    framework: str,
    cap_bytes: int,
    ceiling: int,
    seed: int,
    known_fit: int | None = None,
    accumulation: int = 1,
) -> dict:
    """The largest micro-batch in [1, ceiling] whose minimal loop runs under ``cap_bytes``, to :data:`TRUTH_PRECISION`.

    Gallops out from ``seed`` (steps doubling from :data:`TRUTH_FIRST_STEP` of it) to a
    bracket, then bisects it; ``wall`` is the largest size that ran, ``lowest_failure`` the
    smallest that did not. ``known_fit``: a size that ran under a smaller cap, so it runs under
    this one without being tried (fitting is monotone in the cap too); the gallop then starts
    from it, its first step reaching ``seed``. ``accumulation``: micro-batches per optimizer step.
    """
    started = time.perf_counter()
    outcomes: dict[int, str] = {}

    def check(micro_batch: int) -> bool:
        outcomes[micro_batch] = loop_status(task, framework, micro_batch, cap_bytes, accumulation)
        return outcomes[micro_batch] == "ok"

    seed = max(1, min(seed, ceiling))
    step = max(1, math.ceil(seed * TRUTH_FIRST_STEP))
    low: int | None
    high: int | None
    if known_fit is not None and known_fit < seed:
        low, high, step = known_fit, None, seed - known_fit
    elif check(seed):
        low, high = seed, None
    else:
        low, high = None, seed
        while low is None:
            below = max(0, high - step)
            if below == 0 or check(below):
                low = below
            else:
                high, step = below, step * 2
    while high is None:
        if low >= ceiling:
            high = ceiling + 1
        elif check(min(ceiling, low + step)):
            low, step = min(ceiling, low + step), step * 2
        else:
            high = min(ceiling, low + step)
    while high - low > max(1, int(low * TRUTH_PRECISION)):
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


def loop_status(
    task: str, framework: str, micro_batch: int, cap_bytes: int, accumulation: int = 1, timeout: float = 300
) -> str:
    """Run the minimal loop in ``python probe.py --loop`` under ``cap_bytes``: "ok", "oom", or how it ended."""
    spec = {
        "task": task,
        "framework": framework,
        "micro_batch": micro_batch,
        "cap_bytes": cap_bytes,
        "accumulation": accumulation,
    }
    try:
        completed = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--loop", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **allocator_environment()},
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    lines = completed.stdout.strip().splitlines()
    if completed.returncode == 0 and lines and lines[-1] == "ok":
        return "ok"
    if lines and lines[-1].startswith(("oom", "error")):
        return lines[-1]
    code = completed.returncode
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def allocator_environment() -> dict[str, str]:
    """The allocator variables autobatch starts its trial children with (none where it sets the allocator inside)."""
    from autobatch.process import child

    chosen = getattr(child, "allocator_environment", None)
    return chosen() if chosen is not None else {}


def allocator_note() -> str:
    """The allocator setting the minimal loop and autobatch's trials ran with, in words."""
    from autobatch.process import child

    describe = getattr(child, "allocator_setting", None)
    if describe is None:
        return "glibc's mmap threshold fixed by autobatch.process.child"
    return describe({**os.environ, **allocator_environment()})


def loop_main(spec: dict) -> int:
    """Inside the fresh process: enter as a trial child does, then train the minimal loop; print how it ended."""
    from autobatch.process.child import enter_child

    # RLIMIT_DATA and the allocator setting, before any framework is imported, as for a trial child.
    enter_child({"device": "cpu", "memory_budget_bytes": spec["cap_bytes"], "sys_path": []})
    from autobatch import get_backend, load_task

    framework = spec["framework"]
    try:
        task = load_task(spec["task"])
        train = _torch_loop if framework == "torch" else _tensorflow_loop
        train(task, spec["micro_batch"], spec["accumulation"])
    except BaseException as error:  # noqa: BLE001 - the parent reads the last line
        oom = isinstance(error, MemoryError) or get_backend(framework).is_oom(error)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        print(f"{'oom' if oom else 'error'}: {type(error).__name__}: {first}", flush=True)
        return 0
    print("ok", flush=True)
    return 0


def _batches(task, micro_batch: int, count: int = LOOP_STEPS):
    """``count`` batches of ``micro_batch`` consecutive training samples, wrapping around the split."""
    for step in range(count):
        rows = (np.arange(micro_batch) + step * micro_batch) % task.n_train
        yield task.x_train[rows], task.y_train[rows]


def _torch_loop(task, micro_batch: int, accumulation: int = 1) -> None:
    import torch

    model = task.build_model("torch")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=task.base_learning_rate)
    for index, (x, y) in enumerate(_batches(task, micro_batch, LOOP_STEPS * accumulation)):
        if index % accumulation == 0:
            optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        (loss / accumulation).backward()
        if index % accumulation == accumulation - 1:
            optimizer.step()


def _tensorflow_loop(task, micro_batch: int, accumulation: int = 1) -> None:
    import keras
    import tensorflow as tf

    model = task.build_model("tensorflow")
    # Keras's own accumulation: gradients summed into variables, applied every `accumulation` calls
    steps = accumulation if accumulation > 1 else None
    optimizer = keras.optimizers.Adam(learning_rate=task.base_learning_rate, gradient_accumulation_steps=steps)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    for x, y in _batches(task, micro_batch, LOOP_STEPS * accumulation):
        step(tf.constant(x), tf.constant(y)).numpy()


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

FRAMEWORK_NAMES = {"torch": "PyTorch", "tensorflow": "TensorFlow"}
PEER_LABELS = {
    "lightning-binsearch": "Lightning scale_batch_size, binsearch (its 5% margin)",
    "lightning-power": "Lightning scale_batch_size, power",
    "accelerate": "Accelerate find_executable_batch_size (from the split's size, ×0.9)",
}


def render(run: Run, cases: list[dict], peers: list[str]) -> str:
    args = run.args
    quick = args.quick
    headers = [
        "workload (budget)",
        "framework",
        "method",
        "cap (RLIMIT_DATA)",
        "micro-batch found",
        "true wall (minimal loop), same cap",
        "found / true (95% cap)",
        "found / true ×N, the accumulation the wall is claimed at (95% cap)",
        "found / true (full budget)",
        "seconds",
        "seconds ÷ Lightning binsearch (PyTorch)",
        "work",
        "OOMs in user's process",
        "OOMs in workers",
        "full trial fits the full budget",
    ]
    rows, targets, timing_notes, truth_notes = [], [], [], []
    for case in cases:
        where = f"{case['name']} ({case['budget']})"
        binsearch = case["peers"].get("lightning-binsearch", {})
        reference = binsearch.get("seconds")
        for framework, measured in case["frameworks"].items():
            ours, truths = measured["ours"], measured["truths"]
            reduced = truths["reduced"]["wall"]
            full = truths["full"]["wall"] if "full" in truths else None
            accumulated = truths["accumulated"]["wall"] if "accumulated" in truths else None
            speed = ours["seconds"] / reference if reference else None
            rows.append(
                [
                    where,
                    FRAMEWORK_NAMES[framework],
                    "**autobatch probe** (tune's, 5% margin)",
                    _gib(case["reduced_bytes"]),
                    ours["found"],
                    reduced,
                    _ratio(ours["found"], reduced),
                    _ratio(ours["found"], accumulated),
                    _ratio(ours["found"], full),
                    f"{ours['seconds']:.1f}",
                    f"{speed:.2f}×" if speed else "–",
                    f"{len(ours['probes'])} probes (confirmation ×{ours['accumulation_steps']} included)",
                    "0",
                    ours["ooms_in_workers"],
                    _status_cell(measured["checked"]),
                ]
            )
            caps = (("reduced", case["reduced_bytes"]), ("accumulated", case["reduced_bytes"]))
            for label, cap in (*caps, ("full", case["budget_bytes"])):
                if label not in truths:
                    continue
                truth = truths[label]
                steps = truth.get("accumulation_steps", 1)
                rows.append(
                    [
                        where,
                        FRAMEWORK_NAMES[framework],
                        "true wall: minimal loop, bisected (fresh processes)"
                        + (f", ×{steps} accumulation" if steps > 1 else ""),
                        _gib(cap),
                        truth["wall"],
                        truth["wall"],
                        _ratio(truth["wall"], reduced),
                        _ratio(truth["wall"], accumulated),
                        _ratio(truth["wall"], full),
                        f"{truth['seconds']:.0f}",
                        "–",
                        f"{truth['trials']} processes",
                        "–",
                        sum(1 for s in truth["outcomes"].values() if s != "ok"),
                        "–",
                    ]
                )
                truth_notes.append(
                    f"{case['name']}, {FRAMEWORK_NAMES[framework]}, "
                    + (f"×{steps}, 95% cap: " if label == "accumulated" else f"{label} cap: ")
                    + ", ".join(f"{m}:{_short_status(s)}" for m, s in truth["outcomes"].items())
                )
            ratio = ours["found"] / reduced if reduced else float("nan")
            claimed = ""
            if accumulated:
                at = ours["found"] / accumulated
                claimed = (
                    f", against the loop at ×{ours['accumulation_steps']} {ours['found']}/{accumulated} = {at:.3f} "
                    f"(**{'met' if at >= FOUND_TARGET else 'not met'}**)"
                )
            targets.append(
                f"- {case['name']}, {FRAMEWORK_NAMES[framework]}: found/true {ours['found']}/{reduced} = {ratio:.3f} "
                f"(≥ {FOUND_TARGET}: **{'met' if ratio >= FOUND_TARGET else 'not met'}**){claimed}; "
                + (
                    f"seconds {ours['seconds']:.1f} vs Lightning binsearch {reference:.1f} = {speed:.2f}× "
                    f"(≤ {SPEED_TARGET}×: **{'met' if speed <= SPEED_TARGET else 'not met'}**)"
                    if reference and speed
                    else f"seconds {ours['seconds']:.1f}, Lightning binsearch failed: {binsearch.get('error', '?')}"
                )
            )
            timing_notes.append(_where_time_goes(case["name"], framework, ours))
        torch_truths = case["frameworks"]["torch"]["truths"]
        for peer in peers:
            report = case["peers"][peer]
            found = report.get("found")
            reduced = torch_truths["reduced"]["wall"]
            full = torch_truths["full"]["wall"] if "full" in torch_truths else None
            rows.append(
                [
                    where,
                    "PyTorch",
                    PEER_LABELS[peer],
                    _gib(case["budget_bytes"]),
                    found if found else f"failed: {report.get('error', '?')}",
                    full if full else "–",
                    _ratio(found, reduced),
                    _ratio(found, full),
                    f"{report['seconds']:.1f}" if "seconds" in report else "–",
                    "1.00×" if peer == "lightning-binsearch" and reference else "–",
                    f"{len(report.get('tried', []))} tries",
                    oom_cell(report),
                    "–",
                    _status_cell(report.get("checked")),
                ]
            )
    table = markdown_table(headers, rows, align="lllrrrrrrrrrrrl")
    peer_notes = [
        f"- {case['name']}, {name}: search {r.get('seconds', r.get('seconds_to_failure', float('nan'))):.1f} s, "
        f"child process {r['process_seconds']:.1f} s (imports {r.get('import_seconds', float('nan')):.1f} s), "
        f"data segment {(r.get('data_bytes_before') or 0) / 2**20:.0f} MiB before the search, sizes tried "
        f"{r.get('tried', [])}" + (f", error: {r['error']}" if r.get("error") else "")
        for case in cases
        for name, r in case["peers"].items()
    ]
    baselines = "; ".join(
        f"{case['name']} {FRAMEWORK_NAMES[f]} {(m['ours']['baseline_bytes'] or 0) / 2**20:.0f} MiB"
        for case in cases
        for f, m in case["frameworks"].items()
    )
    return "\n".join(
        [
            "# Memory wall: autobatch's probe, a minimal loop's wall and Lightning, PyTorch and TensorFlow (CPU)",
            "",
            run.header,
            "",
            table,
            "",
            "Targets (found/true against the minimal loop under the same 95% cap, at one step and at the "
            "accumulation tune() claims the wall for; seconds against Lightning's binsearch on the PyTorch model, "
            "for TensorFlow too: Lightning has no TensorFlow):",
            "",
            *targets,
            "",
            "Where autobatch's probe seconds go (probe phase of `tune()`: micro-batch[×accumulation][c: the "
            "confirmation, a full trial]:status seconds "
            "per probe, each probe's seconds from sending it to the worker to its result; the rest is the "
            "worker's start, framework import and task load, fitting, and the study's bookkeeping):",
            "",
            *timing_notes,
            "",
            "Notes:",
            "",
            "- autobatch runs with tune()'s default trial budget and search space: probes train two windows with "
            "an evaluation of two batches between them; the probes marked ×2 are short probes at two accumulation "
            "steps, which place the wall where the gradients held across a window still fit; those marked c are the "
            "confirmation, full trials at the largest accumulation the search tries under the same 95% cap, "
            "lowering the wall until one runs. "
            "Its seconds are the probe phase alone (`autobatch_probe.seconds`), worker start included.",
            f"- The true wall: the task's model, data and loss, Adam, {LOOP_STEPS} optimizer steps on "
            f"consecutive batches of the training split, no evaluation; one fresh process per size tried, entered "
            "as autobatch's trial children are (RLIMIT_DATA set before any framework import, the same allocator "
            f"setting: {allocator_note()}). Bisected to {TRUTH_PRECISION:.1%} of the wall from a bracket found by "
            "galloping out from the largest size the probe saw fit at one step"
            + (
                " (95% cap only with --quick)."
                if quick
                else "; the full-budget bisection "
                "starts at the 95% cap's wall plus 5% of the budget at the probe's fitted bytes per sample."
            ),
            "- The minimal loop at ×N accumulates N micro-batches per optimizer step (PyTorch: backward() into "
            "the same .grad buffers; TensorFlow: keras.optimizers.Adam(gradient_accumulation_steps=N)), "
            f"{LOOP_STEPS} optimizer steps, bisected from the probe's answer under the 95% cap.",
            "- Sizes tried by the minimal loop (micro-batch:status): " + "; ".join(truth_notes) + ".",
            "- The last column: a full trial (tune's default 2048 samples or two windows, whichever is more, and "
            "the whole validation split; accumulation 1) at the size found, in a fresh process under the full "
            "budget; a peer's answer is checked only where it is within 3% of the true wall.",
            f"- Lightning trains the task's PyTorch model on its arrays (cross-entropy, Adam), {STEPS_PER_TRY} "
            "steps per try, no evaluation, in a process capped at the full budget that also holds Lightning "
            "(default allocator settings, as a user runs it). Its seconds are the search call alone (imports "
            "excluded).",
            *peer_notes,
            f"- Data segment of autobatch's trial process with the model built, before training: {baselines}.",
            "",
            "![probe](probe.png)",
            "",
            run.footer(),
        ]
    )


def _where_time_goes(name: str, framework: str, ours: dict) -> str:
    probes = ours["probes"]
    spent = sum(p.get("seconds") or 0.0 for p in probes)
    by_phase = {phase: 0.0 for phase in ("one step", "accumulated", "confirmation")}
    for p in probes:
        by_phase[p["phase"]] += p.get("seconds") or 0.0
    listed = ", ".join(
        f"{p['micro_batch']}{'×' + str(p['accumulation_steps']) if p.get('accumulation_steps', 1) > 1 else ''}"
        f"{'c' if p['phase'] == 'confirmation' else ''}:{p['status']} {p.get('seconds') or 0.0:.1f}"
        for p in probes
    )
    start = next((p.get("timings", {}) for p in probes), {})
    loaded = sum(start.get(k, 0.0) for k in ("worker_start", "framework_import", "task_load"))
    return (
        f"- {name}, {FRAMEWORK_NAMES[framework]}: {ours['seconds']:.1f} s = probes at one step "
        f"{by_phase['one step']:.1f} s + short probes at two steps {by_phase['accumulated']:.1f} s "
        f"+ confirmation {by_phase['confirmation']:.1f} s + other {ours['seconds'] - spent:.1f} s (first worker's start, "
        f"import and load: {loaded:.1f} s); {listed}. "
        f"Whole tune() call (no search trial): {ours['tune_seconds']:.1f} s."
    )


def plot(args, cases: list[dict]) -> None:
    """found/true per workload and framework, and the seconds each took against Lightning's binsearch."""
    figure, (left, right) = new_figure(2, width=11, height=3.8)
    names, ratios, seconds, colours, allowed = [], [], [], [], []
    for case in cases:
        binsearch = case["peers"].get("lightning-binsearch", {})
        for framework, measured in case["frameworks"].items():
            ours = measured["ours"]
            names.append(f"{case['name']}\n{FRAMEWORK_NAMES[framework]}: autobatch")
            ratios.append(ours["found"] / measured["truths"]["reduced"]["wall"])
            seconds.append(ours["seconds"])
            colours.append("tab:green" if framework == "torch" else "tab:orange")
            if binsearch.get("seconds"):
                allowed.append((len(names) - 1, SPEED_TARGET * binsearch["seconds"]))
        names.append(f"{case['name']}\nPyTorch: Lightning binsearch")
        truth = case["frameworks"]["torch"]["truths"]["reduced"]["wall"]
        ratios.append((binsearch.get("found") or 0) / truth)
        seconds.append(binsearch.get("seconds", 0.0))
        colours.append("tab:grey")
    rows = range(len(names))
    left.barh(rows, ratios, color=colours)
    left.axvline(1.0, color="black", linewidth=1, label="minimal loop's wall, 95% cap")
    left.axvline(FOUND_TARGET, color="black", linestyle="--", linewidth=1, label=f"target {FOUND_TARGET}")
    left.set_yticks(rows, names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("micro-batch found / true wall (95% cap)")
    left.legend(fontsize=7, loc="lower left")
    right.barh(rows, seconds, color=colours)
    for row, limit in allowed:  # the speed target: half of Lightning's binsearch on the same workload
        right.plot([limit, limit], [row - 0.4, row + 0.4], color="black", linestyle="--", linewidth=1)
    right.set_yticks(rows, [""] * len(names))
    right.invert_yaxis()
    right.set_xlabel("seconds of search (autobatch: the probe phase)")
    right.set_title(f"dashed: the target, {SPEED_TARGET}× Lightning binsearch", fontsize=9)
    save_plot(figure, args.results, "probe")


def _peer_summary(report: dict) -> str:
    if report.get("error"):
        return f"failed: {report['error']}"
    found, seconds = report.get("found"), report.get("seconds", 0.0)
    return f"{found} in {seconds:.1f} s, {oom_cell(report)} OOM(s), checked: {report.get('checked')}"


def oom_cell(report: dict) -> str:
    """OOMs in the tool's (the user's) process; "(crashed)" when the last one was not recognised."""
    count = report.get("ooms", "?")
    return f"{count} (crashed)" if report.get("crashed_on_oom") else str(count)


def _short_status(status: str) -> str:
    return status if status in ("ok", "oom") or not status.startswith("oom") else "oom"


def _status_cell(status) -> str:
    if status is None:
        return "–"
    if status == "below":
        return "below the true wall (not run)"
    return "yes" if status == "ok" else f"**no** ({status})"


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3f} GiB"


def _ratio(found, true) -> str:
    return f"{found / true:.3f}" if found and true else "–"


if __name__ == "__main__":
    sys.exit(main())
