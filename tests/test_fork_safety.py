"""Fork safety: a task loader that touches CUDA must not break the trials forked after it loaded.

A trial child loads the task once and forks a process per trial. CUDA does not survive a fork:
a loader that initialised it would leave every forked trial failing with "Cannot re-initialize
CUDA in forked subprocess". Trial children ask ``torch.cuda.is_available()`` of NVML instead
(``PYTORCH_NVML_BASED_CUDA_CHECK=1``), and once CUDA is initialised anyway, each trial gets a
fresh process. Here on the CPU the initialised state is simulated; test_gpu runs it on CUDA.
"""

import pytest

from autobatch import TrialBudget, TrialConfig
from autobatch.process.worker import TrialWorker

pytest.importorskip("torch")

pytestmark = pytest.mark.slow

BACKEND = "tests.fork_tasks:ReportingTorchBackend"
BUDGET = TrialBudget(train_samples=64, warmup_steps=0, min_timed_steps=1)


def _two_trials(task: str, device: str = "cpu") -> list:
    with TrialWorker(task, BACKEND, memory_budget="2GiB", device=device) as worker:
        return [worker.run(TrialConfig(8), BUDGET) for _ in range(2)]


def test_after_a_loader_initialised_cuda_each_trial_runs_in_a_fresh_process():
    results = _two_trials("tests.fork_tasks:initialises_cuda")
    assert [result.status for result in results] == ["ok", "ok"], [result.error for result in results]
    assert [result.extras["worker_mode"] for result in results] == ["fresh", "fresh"]
    assert results[0].val_loss == pytest.approx(results[1].val_loss, rel=1e-6)  # both from the same clean start


def test_trial_processes_ask_nvml_whether_cuda_is_there_and_still_fork():
    results = _two_trials("tests.fork_tasks:asks_for_cuda")
    assert [result.status for result in results] == ["ok", "ok"], [result.error for result in results]
    assert [result.extras["worker_mode"] for result in results] == ["fork", "fork"]
    assert [result.extras["nvml_based_cuda_check"] for result in results] == ["1", "1"]
