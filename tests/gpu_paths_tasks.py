"""Tasks and backends for the GPU paths' tests that run on the CPU (test_gpu_paths).

A trial child imports these by path, so what they record happens in the child: they put
it into the trial's extras, where the test reads it back.
"""

from __future__ import annotations

import numpy as np

from autobatch.backends.base import Backend, DeviceConfigurationError, TrialMeasurements
from autobatch.errors import AutobatchError
from autobatch.tasks.workload import Workload

MIB = 2**20

#: what the child did, in order (one list per process)
CALLS: list[str] = []


def _tiny(models) -> Workload:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=64).astype(np.int64)
    return Workload(name="tiny", x_train=x, y_train=y, x_val=x[:16], y_val=y[:16], models=models)


# --- the order a child configures, caps and loads in ----------------------------------------------


def recording_task() -> Workload:
    CALLS.append("load_task")
    return _tiny({"recording": lambda: None})


class RecordingBackend(Backend):
    """A backend on a fake accelerator (``fake:0``) that records what the child asks of it, in order."""

    name = "recording"
    allocator_peak_bytes = 600 * MIB
    overhead_bytes: int | None = None

    def configure_device(self, device, budget_bytes):
        CALLS.append("configure_device")

    def apply_memory_cap(self, budget_bytes, device):
        CALLS.append("apply_memory_cap")

    def run_trial(self, workload, config, budget, device, progress):
        CALLS.append("run_trial")
        progress.mark_baseline()
        return TrialMeasurements(
            samples_per_second=1.0, val_loss=0.5, samples_trained=8, steps_timed=1, extras={"calls": list(CALLS)}
        )

    def is_oom(self, error):
        return False

    def peak_memory_bytes(self, device):
        return self.allocator_peak_bytes

    def current_memory_bytes(self, device):
        return 0

    def device_overhead_bytes(self, device):
        return self.overhead_bytes

    def training_session(self, workload, config, **options):
        CALLS.append("training_session")
        raise AutobatchError(f"stopped here: {CALLS}")


class UnconfigurableBackend(RecordingBackend):
    """A device that the framework had initialised before it could be configured (as TensorFlow refuses it)."""

    def configure_device(self, device, budget_bytes):
        CALLS.append("configure_device")
        raise DeviceConfigurationError(
            "TensorFlow could not apply memory growth to fake:0: Physical devices cannot be modified after being "
            "initialized"
        )


class ContextHoldingBackend(RecordingBackend):
    """A device where the process holds 500 MiB outside the allocator (a CUDA context and its libraries)."""

    overhead_bytes = 500 * MIB
