"""What the device and the trial process did while a trial ran, sampled every ~100 ms.

A :class:`TelemetrySampler` runs in a daemon thread inside the trial process. On a
CUDA device it reads NVML (nvidia-ml-py): device memory in use, GPU and memory
utilization, power and SM clock. Always, it reads the trial process and its children
(data-loader workers) with psutil: resident memory and CPU use. It keeps running
sums and maxima, not every sample, and :meth:`TelemetrySampler.stop` returns a flat
summary that goes into ``TrialResult.telemetry`` and the trial's user attrs.

Telemetry never fails a trial: with no NVIDIA driver or device it says so once, in
``notes``, and samples the host alone. Means are taken over the training phase when
the worker reports phases (setup and evaluation would dilute them); peaks over the
whole trial. NVML's memory figure is the whole device's, every process included:
``device_memory_at_start_bytes`` is the reading before the trial touched the GPU.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from autobatch._validation import Interval, check_param

#: seconds between samples
DEFAULT_INTERVAL = 0.1
#: seconds between scans for new child processes (a scan reads every process in /proc)
CHILD_SCAN_INTERVAL = 1.0
#: a source that fails this many samples in a row is dropped, with a note
FAILURES_BEFORE_DROPPING = 3
#: setting this environment variable to 0 turns telemetry off in trial workers
DISABLE_VARIABLE = "AUTOBATCH_TELEMETRY"
#: fewer samples than this (a trial shorter than ~0.5 s) are too few to give advice on
MIN_SAMPLES_FOR_ADVICE = 5
#: below this mean GPU utilization while training, the GPU waits for its input
LOW_GPU_UTILIZATION = 50.0
#: above this mean GPU utilization while training, the trial is compute bound
HIGH_GPU_UTILIZATION = 85.0
#: below this share of the usable cores, the CPU trial leaves the CPU idle
LOW_CPU_SHARE = 0.5
#: above this share of the usable cores, the CPU trial is compute bound
HIGH_CPU_SHARE = 0.85
#: the thread's stack: the sampler needs little, and on the CPU a stack counts against RLIMIT_DATA
_STACK_BYTES = 512 * 1024

# (summary key, sample key, how): what a summary holds. "max" over all samples, "mean"
# over the training phase (or all samples if none was marked as training).
_SUMMARY = (
    ("peak_rss_bytes", "rss_bytes", "max"),
    ("mean_cpu_percent", "cpu_percent", "mean"),
    ("max_cpu_percent", "cpu_percent", "max"),
    ("peak_device_memory_bytes", "device_memory_used_bytes", "max"),
    ("mean_gpu_utilization", "gpu_utilization", "mean"),
    ("max_gpu_utilization", "gpu_utilization", "max"),
    ("mean_memory_utilization", "memory_utilization", "mean"),
    ("max_memory_utilization", "memory_utilization", "max"),
    ("mean_power_watts", "power_watts", "mean"),
    ("max_power_watts", "power_watts", "max"),
    ("mean_sm_clock_mhz", "sm_clock_mhz", "mean"),
    ("max_sm_clock_mhz", "sm_clock_mhz", "max"),
)

#: summary keys a study stores as user attrs on each trial (flat, for optuna-dashboard)
ATTR_KEYS = (
    "peak_device_memory_bytes",
    "device_memory_total_bytes",
    "mean_gpu_utilization",
    "max_gpu_utilization",
    "mean_memory_utilization",
    "mean_power_watts",
    "mean_sm_clock_mhz",
    "peak_rss_bytes",
    "mean_cpu_percent",
    "cpu_cores",
)


class TelemetrySampler:
    """Samples ``device`` and this process every ``interval`` seconds until stopped.

    Use as a context manager or with :meth:`start` and :meth:`stop`; ``phase`` may be
    set at any time (``setup``, ``train``, ``eval``) and tags the samples that follow.
    """

    def __init__(self, device: str = "cpu", interval: float = DEFAULT_INTERVAL, *, pid: int | None = None):
        check_param("interval", interval, Interval(float, 0, None, closed="neither", unit="seconds"))
        self.device = device
        self.interval = float(interval)
        self.phase = "setup"
        self.notes: list[str] = []
        self._pid = os.getpid() if pid is None else pid
        self._sources: list[Any] = []
        self._failures: dict[str, int] = {}
        self._stats: dict[tuple[str, str], list[float]] = {}  # (sample key, phase) -> [count, sum, max]
        self._first: dict[str, float] = {}
        self._constants: dict[str, Any] = {}
        self._samples = 0
        self._lock = threading.Lock()
        self._sampling = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None
        self._seconds = 0.0
        self._summary: dict[str, Any] | None = None

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> TelemetrySampler:
        """Open the sources, take the first sample now, and sample in the background from here on."""
        if self._started_at is not None:
            return self
        self._open_sources()
        self._started_at = time.perf_counter()
        self.sample()
        thread = threading.Thread(target=self._run, name="autobatch-telemetry", daemon=True)
        previous = threading.stack_size()
        try:
            threading.stack_size(_STACK_BYTES)
            thread.start()
            self._thread = thread
        except (RuntimeError, MemoryError, ValueError) as error:  # no memory left for a thread under the cap
            self._note(f"telemetry sampled only at the start and the end: no background thread ({error})")
        finally:
            threading.stack_size(previous)
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling (idempotent), take a last sample, close the sources, and return :meth:`summary`."""
        if self._summary is not None:
            return self._summary
        if self._started_at is None:
            return self.summary()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 5 * self.interval))
        if self._thread is None or not self._thread.is_alive():  # else it is stuck in a reading: leave it be
            self.sample()
        self._seconds = time.perf_counter() - self._started_at
        for source in self._sources:
            source.close()
        self._summary = self.summary()
        return self._summary

    def summary(self) -> dict[str, Any]:
        """Peaks, means and counts of what was sampled so far, as plain JSON values."""
        with self._lock:
            train = [key for key, phase in self._stats if phase == "train"]
            means_over = "train" if train else "trial"
            summary: dict[str, Any] = {
                "sources": [source.name for source in self._sources],
                "samples": self._samples,
                "interval_seconds": self.interval,
                "seconds": round(self._seconds, 3),
                "means_over": means_over,
                **self._constants,
            }
            for name, sample_key, how in _SUMMARY:
                value = self._aggregate(sample_key, how, train_only=means_over == "train" and how == "mean")
                if value is not None:
                    summary[name] = int(value) if name.endswith("_bytes") else round(value, 2)
            if "device_memory_used_bytes" in self._first:
                summary["device_memory_at_start_bytes"] = int(self._first["device_memory_used_bytes"])
            if self.notes:
                summary["notes"] = list(self.notes)
            return summary

    def _aggregate(self, sample_key: str, how: str, train_only: bool) -> float | None:
        rows = [stats for (key, phase), stats in self._stats.items() if key == sample_key]
        trained = [stats for (key, phase), stats in self._stats.items() if key == sample_key and phase == "train"]
        if train_only and trained:  # a reading never taken while training falls back to the whole trial
            rows = trained
        count = sum(row[0] for row in rows)
        if not count:
            return None
        return max(row[2] for row in rows) if how == "max" else sum(row[1] for row in rows) / count

    def _open_sources(self) -> None:
        try:
            self._sources.append(_HostSource(self._pid))
            self._constants["cpu_cores"] = self._sources[-1].cores
        except Exception as error:  # psutil missing or broken: the device may still be read
            self._note(f"host telemetry unavailable: {type(error).__name__}: {error}")
        if self.device.startswith("cuda"):
            try:
                source = _NvmlSource(self.device, self._note)
            except Exception as error:
                from autobatch.core.devices import nvml_error_text

                self._note(f"GPU telemetry unavailable: {nvml_error_text(error)}; the host alone is sampled")
            else:
                self._sources.append(source)
                self._constants.update(source.constants)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Take one sample now (the thread calls this every ``interval``); a failed reading is skipped."""
        with self._sampling:  # the thread and stop() never read the sources at once
            readings: dict[str, float] = {}
            for source in list(self._sources):
                if source.name in self._failures and self._failures[source.name] < 0:
                    continue  # dropped
                try:
                    readings.update(source.read())
                    self._failures[source.name] = 0
                except Exception as error:  # a failed reading is skipped, never raised into the trial
                    failures = self._failures.get(source.name, 0) + 1
                    self._failures[source.name] = failures
                    if failures >= FAILURES_BEFORE_DROPPING:
                        self._failures[source.name] = -1
                        self._note(f"{source.name} telemetry stopped after {failures} failed readings: {error}")
            if not readings:
                return
            with self._lock:
                phase = self.phase
                self._samples += 1
                for key, value in readings.items():
                    if value is None:
                        continue
                    self._first.setdefault(key, value)
                    stats = self._stats.get((key, phase))
                    if stats is None:
                        self._stats[(key, phase)] = [1, value, value]
                    else:
                        stats[0] += 1
                        stats[1] += value
                        stats[2] = max(stats[2], value)

    def _note(self, text: str) -> None:
        if text not in self.notes:  # said once, however often it happens
            self.notes.append(text)


def enabled() -> bool:
    """Whether trial workers sample telemetry (``AUTOBATCH_TELEMETRY=0`` turns it off)."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def telemetry_attrs(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The flat user attrs a study stores for a trial's telemetry summary."""
    if not summary:
        return {}
    attrs = {key: summary[key] for key in ATTR_KEYS if summary.get(key) is not None}
    attrs["telemetry_samples"] = summary.get("samples", 0)
    if summary.get("notes"):
        attrs["telemetry_note"] = "; ".join(summary["notes"])[:500]
    return attrs


def advice(
    telemetry: dict[str, Any] | None,
    *,
    device: str | None,
    backend: str | None = None,
    num_workers: int = 0,
    mixed_precision: bool = False,
) -> list[str]:
    """What a trial's telemetry says about where its time went, and what to try.

    ``telemetry`` is a summary or the user attrs made from one (same keys).
    """
    if not telemetry:
        return []
    lines = []
    note = telemetry.get("telemetry_note") or "; ".join(telemetry.get("notes", []))
    if note:
        lines.append(f"Telemetry: {note}.")
    if telemetry.get("telemetry_samples", telemetry.get("samples", 0)) < MIN_SAMPLES_FOR_ADVICE:
        return lines  # too short a trial to tell where its time went
    gpu = telemetry.get("mean_gpu_utilization")
    if gpu is not None:
        lines.append(_gpu_advice(telemetry, gpu, backend, num_workers, mixed_precision))
    elif (device or "cpu") == "cpu" and telemetry.get("mean_cpu_percent") is not None and telemetry.get("cpu_cores"):
        lines.append(_cpu_advice(telemetry, backend))
    return lines


def _gpu_advice(
    telemetry: dict, utilization: float, backend: str | None, num_workers: int, mixed_precision: bool
) -> str:
    peak = telemetry.get("max_gpu_utilization")
    seen = f"keeps the GPU at {utilization:.0f}% utilization on average while training" + (
        f" (at most {peak:.0f}%)" if peak is not None else ""
    )
    if utilization < LOW_GPU_UTILIZATION:
        if backend == "tensorflow":
            fix = (
                "the tf.data pipeline prefetches already: do decoding and augmentation in it with "
                "num_parallel_calls=tf.data.AUTOTUNE, or cache the data"
            )
        elif num_workers == 0:
            fix = "try --num-workers 4 (DataLoader worker processes; pin_memory is on with CUDA already)"
        else:
            fix = f"try more than --num-workers {num_workers}, and check that pin_memory stays on"
        host = telemetry.get("mean_cpu_percent")
        busy = f"; the training process uses {host / 100:.1f} CPU cores" if host is not None else ""
        return (
            f"The recommended config {seen}: the GPU waits for its input, so the input pipeline is the "
            f"bottleneck{busy}. {fix[0].upper()}{fix[1:]}."
        )
    if utilization < HIGH_GPU_UTILIZATION:
        return (
            f"The recommended config {seen}: some headroom is left; more data-loading workers "
            "(--num-workers) or a larger micro-batch may still add speed."
        )
    precision = "" if mixed_precision else " --mixed-precision may still be faster (tensor cores)."
    return f"The recommended config {seen}: it is compute bound, and a larger batch adds little speed.{precision}"


def _cpu_advice(telemetry: dict, backend: str | None) -> str:
    cores = int(telemetry["cpu_cores"])
    used = telemetry["mean_cpu_percent"] / 100
    seen = f"The recommended config used {used:.1f} of {cores} usable CPU cores on average while training"
    if used < LOW_CPU_SHARE * cores:
        threads = (
            "torch.set_num_threads / OMP_NUM_THREADS" if backend != "tensorflow" else "TensorFlow's intra-op threads"
        )
        return (
            f"{seen}: the CPU is mostly idle. Check the framework's thread count ({threads}), whether other "
            "processes hold the rest, or try larger micro-batches, which cost less per sample in overhead."
        )
    if used >= HIGH_CPU_SHARE * cores:
        return f"{seen}: the CPU is saturated, so the trial is compute bound; a GPU is where more speed lies."
    return f"{seen}: some cores stay idle; data loading or per-step overhead takes part of the time."


class _HostSource:
    """Resident memory and CPU use of one process and its children, via psutil."""

    name = "psutil"

    def __init__(self, pid: int):
        import psutil

        self._psutil = psutil
        self._process = psutil.Process(pid)
        self._children: dict[int, Any] = {}
        self._scanned_at = float("-inf")
        self._cpu_seconds: dict[int, float] = {}
        self._read_at: float | None = None
        try:
            self.cores = len(os.sched_getaffinity(pid))
        except (AttributeError, OSError):
            self.cores = psutil.cpu_count() or 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        if now - self._scanned_at >= CHILD_SCAN_INTERVAL:
            self._scanned_at = now
            try:
                found = self._process.children(recursive=True)
            except self._psutil.Error:
                found = []
            self._children = {child.pid: self._children.get(child.pid, child) for child in found}
        rss = 0
        cpu_delta = 0.0
        seen: dict[int, float] = {}
        for pid, process in [(self._process.pid, self._process), *self._children.items()]:
            try:
                with process.oneshot():
                    rss += process.memory_info().rss
                    times = process.cpu_times()
            except self._psutil.Error:
                continue  # a child that ended between scans
            seconds = times.user + times.system
            seen[pid] = seconds
            cpu_delta += max(0.0, seconds - self._cpu_seconds.get(pid, seconds))  # a new child counts from now
        self._cpu_seconds = seen
        readings: dict[str, float] = {"rss_bytes": float(rss)}
        if self._read_at is not None and now > self._read_at:
            readings["cpu_percent"] = 100.0 * cpu_delta / (now - self._read_at)
        self._read_at = now
        return readings

    def close(self) -> None:
        pass


class _NvmlSource:
    """One GPU through NVML: memory in use, utilization, power, SM clock."""

    name = "nvml"

    def __init__(self, device: str, note):
        import pynvml

        from autobatch.core.devices import nvml_handle

        self._nvml = pynvml
        self._note = note
        pynvml.nvmlInit()
        try:
            self._handle = nvml_handle(device)
            memory = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self.constants: dict[str, Any] = {"device_memory_total_bytes": int(memory.total)}
        try:
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.constants["device_name"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            pass
        self._unsupported: set[str] = set()
        self._open = True

    def read(self) -> dict[str, float]:
        nvml = self._nvml
        readings = {"device_memory_used_bytes": float(nvml.nvmlDeviceGetMemoryInfo(self._handle).used)}
        rates = self._optional("utilization", nvml.nvmlDeviceGetUtilizationRates)
        if rates is not None:
            readings["gpu_utilization"] = float(rates.gpu)
            readings["memory_utilization"] = float(rates.memory)
        power = self._optional("power", nvml.nvmlDeviceGetPowerUsage)
        if power is not None:
            readings["power_watts"] = power / 1000.0  # NVML reports milliwatts
        clock = self._optional("SM clock", lambda handle: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        if clock is not None:
            readings["sm_clock_mhz"] = float(clock)
        return readings

    def _optional(self, what: str, read):
        """A reading that some GPUs (MIG slices, some boards) do not support: noted once, then skipped."""
        if what in self._unsupported:
            return None
        try:
            return read(self._handle)
        except self._nvml.NVMLError as error:
            self._unsupported.add(what)
            self._note(f"NVML cannot read {what} on this GPU ({type(error).__name__})")
            return None

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
