"""A user's own task, wrong in a common way: one line that names the parameter, and the storage as it was.

Each bad task goes through ``tune`` as a user's would: loaded here, then built in a trial worker
by the first probe. The error must name what to fix in one line, and neither a new storage file
nor a new study may be left behind; a study already in the storage stays as it was.
"""

from __future__ import annotations

import sqlite3

import optuna
import pytest

pytest.importorskip("torch")

from autobatch import AutobatchError, tune  # noqa: E402

TORCH_CASES = [
    ("tests.byo_error_tasks:model_is_not_a_module", "model=", "torch.nn.Module"),
    ("tests.byo_error_tasks:loss_is_not_a_scalar", "loss=", "scalar"),
    ("tests.byo_error_tasks:collate_fails", "collate_fn=", "raised TypeError"),
    ("tests.byo_error_tasks:empty_training_split", "train_data=", "at least one sample"),
]


def _studies(path) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT study_name FROM studies ORDER BY study_name").fetchall()


@pytest.fixture
def kept_storage(tmp_path):
    """A storage that already holds a study with a trial: it must come out of a failed tune unchanged."""
    url = f"sqlite:///{tmp_path}/kept.db"
    study = optuna.create_study(storage=url, study_name="earlier-work")
    study.add_trial(optuna.trial.create_trial(value=1.0, params={}, distributions={}))
    return url, tmp_path / "kept.db"


def _tune(task: str, storage: str, backend: str | None = None):
    return tune(task, backend, memory_budget="2GiB", n_trials=2, storage=storage, study_name="new-study")


@pytest.mark.parametrize(("task", "names", "says"), TORCH_CASES, ids=[c[0].split(":")[1] for c in TORCH_CASES])
def test_a_bad_torch_task_is_one_line_that_names_the_parameter(task, names, says, kept_storage, tmp_path):
    url, path = kept_storage
    before = _studies(path)
    with pytest.raises(AutobatchError) as caught:
        _tune(task, url)
    message = str(caught.value)
    assert "\n" not in message and names in message and says in message, message
    assert _studies(path) == before  # no new study, the earlier one kept
    assert len(optuna.load_study(study_name="earlier-work", storage=url).trials) == 1

    fresh = tmp_path / "fresh.db"
    with pytest.raises(AutobatchError):
        _tune(task, f"sqlite:///{fresh}")
    assert not fresh.exists()  # bad input leaves no new file behind


def test_an_uncompiled_keras_model_is_one_line_that_names_the_model(kept_storage):
    pytest.importorskip("tensorflow")
    url, path = kept_storage
    before = _studies(path)
    with pytest.raises(AutobatchError) as caught:
        _tune("tests.keras_task_tasks:uncompiled_task", url)
    message = str(caught.value)
    assert "\n" not in message and "model=" in message and "compiled keras.Model" in message, message
    assert _studies(path) == before


def test_the_cli_says_it_in_one_line_with_exit_code_2(run_cli, tmp_path):
    done = run_cli(
        "tune",
        "tests.byo_error_tasks:loss_is_not_a_scalar",
        "--trials",
        "2",
        "--memory-budget",
        "2GiB",
        "--storage",
        f"sqlite:///{tmp_path}/cli.db",
    )
    assert done.returncode == 2, done.stderr
    # Above it on stderr: the progress bar and the probe's line; the error is the last line, and one.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("autobatch tune: error: ") and "loss=" in last and "scalar" in last, done.stderr
    assert done.stderr.count("error: ") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "cli.db").exists()
