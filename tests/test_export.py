"""``autobatch export``: each format read back by what reads it; bad input is one line and writes nothing."""

from __future__ import annotations

import json

import pytest

from autobatch.cli.main import main
from tests.recommendation_studies import MAX_MICRO_BATCH, RECOMMENDED, store_study

MICRO, ACCUMULATION, RATE = RECOMMENDED["micro_batch_size"], RECOMMENDED["accumulation_steps"], 0.03


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('export')}/studies.db"
    store_study(url, "s")
    store_study(url, "unfinished", feasible=False)
    return url


def _export(storage, *args: str) -> int:
    return main(["export", "--storage", storage, *args])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, repr(err)
    return err


def test_json_and_yaml_hold_the_recommendation(storage, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    expected = {
        "micro_batch_size": MICRO,
        "accumulation_steps": ACCUMULATION,
        "learning_rate": RATE,
        "eval_batch_size": MAX_MICRO_BATCH,
        "study_name": "s",
        "horizon": None,
        "effective_batch_size": MICRO * ACCUMULATION,
    }
    assert _export(storage, "--study-name", "s", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == expected

    out = tmp_path / "rec.yaml"
    assert _export(storage, "--study-name", "s", "--format", "yaml", "--out", str(out)) == 0
    assert yaml.safe_load(out.read_text()) == expected
    assert f"to {out}" in capsys.readouterr().err


def test_lightning_is_a_lightning_cli_fragment(storage, tmp_path):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "autobatch.yaml"
    assert _export(storage, "--study-name", "s", "--format", "lightning", "--out", str(out)) == 0
    text = out.read_text()
    assert text.startswith("# autobatch: micro-batch 4 × 3 accumulation steps (effective batch 12)")
    # The flat form LightningCLI reads whether the classes are fixed or given by class_path (subclass mode).
    assert yaml.safe_load(text) == {
        "trainer": {"accumulate_grad_batches": ACCUMULATION},
        "model": {"lr": RATE},
        "data": {"batch_size": MICRO},
    }
    args = ("--batch-arg-name", "train_batch_size", "--lr-attr-name", "learning_rate")
    assert _export(storage, "--study-name", "s", "--format", "lightning", "--out", str(out), *args) == 0
    config = yaml.safe_load(out.read_text())
    assert config["model"] == {"learning_rate": RATE} and config["data"] == {"train_batch_size": MICRO}


def test_keras_holds_fit_and_optimizer_settings(storage, capsys):
    assert _export(storage, "--study-name", "s", "--format", "keras") == 0
    assert json.loads(capsys.readouterr().out) == {
        "batch_size": MICRO,
        "optimizer": {"gradient_accumulation_steps": ACCUMULATION, "learning_rate": RATE},
    }


def test_hf_fields_are_training_arguments(storage, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    assert _export(storage, "--study-name", "s", "--format", "hf", "--out", str(out)) == 0
    fields = json.loads(out.read_text())
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), **fields)
    assert arguments.per_device_train_batch_size == MICRO
    assert arguments.gradient_accumulation_steps == ACCUMULATION and arguments.learning_rate == RATE
    assert arguments.per_device_eval_batch_size == MAX_MICRO_BATCH


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--study-name", "s", "--format", "xml"],
            "--format='xml' is invalid: one of json, yaml, lightning, keras, hf",
        ),
        (
            ["--study-name", "s", "--format", "json", "--lr-attr-name", "lr"],
            "--lr-attr-name='lr' is invalid: given only",
        ),
        (["--format", "json"], "--study-name=None is invalid"),
        (["--study-name", "gone", "--format", "json"], "study_name='gone': no such study"),
        (["--study-name", "unfinished", "--format", "hf"], "study_name='unfinished': the study has no recommendation"),
    ],
    ids=["format", "option-for-lightning-only", "no-study-name", "no-such-study", "no-recommendation"],
)
def test_bad_input_is_one_line_and_writes_nothing(storage, tmp_path, capsys, args, message):
    out = tmp_path / "config.out"
    assert _export(storage, *args, "--out", str(out)) == 2
    assert _error_line(capsys).startswith(f"autobatch export: error: {message}")
    assert not out.exists()


def test_yaml_without_pyyaml_says_how_to_install_it(storage, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # what `import yaml` meets where it is missing
    out = tmp_path / "config.yaml"
    assert _export(storage, "--study-name", "s", "--format", "lightning", "--out", str(out)) == 2
    assert _error_line(capsys) == "autobatch export: error: YAML output needs PyYAML: pip install pyyaml\n"
    assert not out.exists()
