"""A recommendation trained by a real Hugging Face ``Trainer``, on a tiny GPT-2 built from a config (no download)."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from autobatch.cli import main  # noqa: E402
from autobatch.errors import InvalidParameterError  # noqa: E402
from autobatch.integrations import Recommendation, load_recommendation  # noqa: E402
from autobatch.integrations.huggingface import (  # noqa: E402
    AutobatchTrainerCallback,
    RecommendationMismatchError,
    apply_to_trainer,
    training_arguments,
)
from tests.recommendation_studies import MAX_MICRO_BATCH, RECOMMENDED, store_study  # noqa: E402

N_TRAIN = 48  # 12 micro-batches of 4: 4 optimizer steps at the stored 4 x 3
N_EVAL = 30  # one eval batch of 24 and one of 6 at the stored eval batch size
SEQUENCE = 8

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def one_thread():
    # A model this small trains in milliseconds on one thread; PyTorch's threads spin for seconds on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (count, SEQUENCE), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _trainer(args, trainer_class=transformers.Trainer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    batch_sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append((module.training, len(kwargs["input_ids"]))), with_kwargs=True
    )
    trainer = trainer_class(model=model, args=args, train_dataset=Tokens(N_TRAIN, 0), eval_dataset=Tokens(N_EVAL, 1))
    return trainer, batch_sizes


def _options(tmp_path) -> dict:
    return {"output_dir": str(tmp_path / "out"), "report_to": [], "save_strategy": "no", "use_cpu": True,
            "num_train_epochs": 1, "logging_strategy": "no", "disable_tqdm": True}  # fmt: skip


def _assert_trained_as_recommended(trainer, batch_sizes, micro, accumulation, learning_rate, eval_batch):
    assert [size for training, size in batch_sizes if training] == [micro] * (N_TRAIN // micro)
    assert trainer.state.global_step == N_TRAIN // (micro * accumulation)
    assert trainer.lr_scheduler.base_lrs == [pytest.approx(learning_rate)] * len(trainer.lr_scheduler.base_lrs)
    assert [size for training, size in batch_sizes if not training] == [eval_batch, N_EVAL - eval_batch]


def test_arguments_from_a_stored_study_train_the_recommended_run(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    store_study(storage, "hf")
    recommendation = load_recommendation(study_name="hf", storage=storage)
    args = training_arguments(recommendation, **_options(tmp_path))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 3)
    assert (args.learning_rate, args.per_device_eval_batch_size) == (RECOMMENDED["learning_rate"], MAX_MICRO_BATCH)

    trainer, batch_sizes = _trainer(args)
    trainer.add_callback(AutobatchTrainerCallback(recommendation))
    trainer.train()
    trainer.evaluate()
    _assert_trained_as_recommended(trainer, batch_sizes, 4, 3, RECOMMENDED["learning_rate"], MAX_MICRO_BATCH)


def test_arguments_exported_by_the_cli_train_the_recommended_run(tmp_path):
    # The path a user takes without Python in between: `autobatch export --format hf`, then their own script.
    storage = f"sqlite:///{tmp_path}/study.db"
    store_study(storage, "hf")
    exported = tmp_path / "hf.json"
    assert main(["export", "--storage", storage, "--study-name", "hf", "--format", "hf", "--out", str(exported)]) == 0
    args = transformers.TrainingArguments(**json.loads(exported.read_text()), **_options(tmp_path))
    trainer, batch_sizes = _trainer(args)
    trainer.train()
    trainer.evaluate()
    _assert_trained_as_recommended(trainer, batch_sizes, 4, 3, RECOMMENDED["learning_rate"], MAX_MICRO_BATCH)


def test_apply_to_a_built_trainer_sets_what_train_reads(tmp_path, caplog):
    args = transformers.TrainingArguments(
        per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=5e-5, **_options(tmp_path)
    )
    trainer, batch_sizes = _trainer(args)
    recommendation = Recommendation(micro_batch_size=6, accumulation_steps=2, learning_rate=0.01, eval_batch_size=20)
    with caplog.at_level(logging.INFO, logger="autobatch.integrations.huggingface"):
        changes = apply_to_trainer(trainer, recommendation)
        trainer.train()
    trainer.evaluate()

    assert changes == {
        "per_device_train_batch_size": (16, 6),
        "gradient_accumulation_steps": (1, 2),
        "learning_rate": (5e-5, 0.01),
        "per_device_eval_batch_size": (8, 20),
    }
    _assert_trained_as_recommended(trainer, batch_sizes, 6, 2, 0.01, 20)
    assert any("training at the recommended micro-batch 6" in record.getMessage() for record in caplog.records)


def test_a_trainer_that_ignores_the_batch_size_is_stopped_before_its_first_step(tmp_path):
    class FixedBatch(transformers.Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=16)

    trainer, batch_sizes = _trainer(transformers.TrainingArguments(**_options(tmp_path)), FixedBatch)
    apply_to_trainer(trainer, RECOMMENDED)
    with pytest.raises(RecommendationMismatchError, match=r"'per_device_train_batch_size': 16"):
        trainer.train()
    assert batch_sizes == []


def test_overrides_that_contradict_the_recommendation_are_refused(tmp_path):
    recommendation = Recommendation(micro_batch_size=4, accumulation_steps=3, learning_rate=0.03, eval_batch_size=24)
    options = _options(tmp_path)
    with pytest.raises(InvalidParameterError, match=r"^per_device_train_batch_size=8 is invalid: 4 as recommended"):
        training_arguments(recommendation, per_device_train_batch_size=8, **options)
    with pytest.raises(InvalidParameterError, match=r"^auto_find_batch_size=True .*effective batch changes"):
        training_arguments(recommendation, auto_find_batch_size=True, **options)
    with pytest.raises(InvalidParameterError, match=r"^per_device_eval_batch_size=32 is invalid: at most 24"):
        training_arguments(recommendation, per_device_eval_batch_size=32, **options)
    # The same value is no contradiction; a smaller eval batch is safe; without a wall the eval batch is yours.
    args = training_arguments(recommendation, learning_rate=0.03, per_device_eval_batch_size=16, **options)
    assert (args.learning_rate, args.per_device_eval_batch_size) == (0.03, 16)
    no_wall = dataclasses.replace(recommendation, eval_batch_size=None)
    assert training_arguments(no_wall, per_device_eval_batch_size=40, **options).per_device_eval_batch_size == 40
