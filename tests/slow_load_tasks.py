"""A task that takes seconds to load, as a framework import does, and trains in no time."""

from __future__ import annotations

import os
import time

from tests.synthetic_backend import SyntheticBackend
from tests.synthetic_backend import workload as synthetic_workload

#: how long loading takes; the worker's child reads it when it loads the task
LOAD_SECONDS = float(os.environ.get("AUTOBATCH_TEST_LOAD_SECONDS", "3"))


def workload():
    time.sleep(LOAD_SECONDS)
    return synthetic_workload()


class SlowTrialBackend(SyntheticBackend):
    """Trials that take ``AUTOBATCH_TEST_TRIAL_SECONDS`` each."""

    def run_trial(self, workload, config, budget, device, progress):
        progress.mark_baseline()
        progress.phase = "train"
        time.sleep(float(os.environ.get("AUTOBATCH_TEST_TRIAL_SECONDS", "30")))
        return super().run_trial(workload, config, budget, device, progress)
