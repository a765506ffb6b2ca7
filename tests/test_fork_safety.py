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


def test_a_task_whose_factory_ran_torch_ops_still_forks_and_no_trial_hangs():
    # Loaded on several threads, the factory's matrix product would leave OpenMP's team behind the
    # fork, and the first parallel op of every forked trial would wait for it forever.
    with TrialWorker("tests.fork_tasks:computes_its_data_with_torch", "torch", memory_budget="2GiB") as worker:
        results = [worker.run(TrialConfig(256), BUDGET, timeout=120) for _ in range(2)]
    assert [result.status for result in results] == ["ok", "ok"], [result.error for result in results]
    assert [result.extras["worker_mode"] for result in results] == ["fork", "fork"]


def test_a_task_whose_factory_starts_tensorflow_is_loaded_in_each_forked_trial():
    # Building a tf.data pipeline starts TensorFlow's eager context and its thread pools, which a
    # fork does not survive: the worker imports TensorFlow, runs nothing, and each forked trial loads
    # the task itself (a task load per trial instead of a process and an import per trial).
    pytest.importorskip("tensorflow")
    with TrialWorker("tests.fork_tasks:builds_a_tf_data_pipeline", "tensorflow", memory_budget="3GiB") as worker:
        results = [worker.run(TrialConfig(32), BUDGET, timeout=120) for _ in range(2)]
    assert [result.status for result in results] == ["ok", "ok"], [result.error for result in results]
    assert [result.extras["worker_mode"] for result in results] == ["fork", "fork"]
    assert all(result.timings["task_load"] > 0 for result in results)  # each trial loaded it
    assert results[1].timings["framework_import"] == 0.0  # imported once, by the worker
    assert results[0].val_loss == pytest.approx(results[1].val_loss, rel=1e-6)
