"""A recommendation applied to a real Lightning run: what the DataLoader yields, the optimizer steps, nothing left behind."""

from __future__ import annotations

import logging

import pytest

pl = pytest.importorskip("lightning.pytorch")
torch = pytest.importorskip("torch")

from autobatch.errors import AutobatchError, InvalidParameterError  # noqa: E402
from autobatch.integrations import Recommendation  # noqa: E402
from autobatch.integrations.lightning import AutobatchCallback, apply_recommendation  # noqa: E402
from tests.recommendation_studies import RECOMMENDED, store_study  # noqa: E402

N_SAMPLES = 48  # 12 micro-batches of 4, so 4 windows of 3 at the stored recommendation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints for a CPU run, a small dataset


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32, fixed_batch_size: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.fixed_batch_size = fixed_batch_size  # a loader that ignores the attribute

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(N_SAMPLES, 3, generator=generator), torch.randn(N_SAMPLES, 1, generator=generator)
        dataset = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(dataset, batch_size=self.fixed_batch_size or self.batch_size)


class Model(pl.LightningModule):
    def __init__(self, lr: float = 0.1, fixed_lr: float | None = None):
        super().__init__()
        self.save_hyperparameters()  # lr lives in hparams too, as Lightning's tuner expects
        self.lr = lr
        self.fixed_lr = fixed_lr
        self.layer = torch.nn.Linear(3, 1)
        self.frozen = torch.nn.Dropout(0.5)  # a submodule the user keeps in eval mode
        self.batch_sizes: list[int] = []
        self.samples_per_step: list[int] = []
        self.samples_since_step = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(len(x))
        self.samples_since_step += len(x)
        return torch.nn.functional.mse_loss(self.layer(self.frozen(x)), y)

    def on_before_optimizer_step(self, optimizer):
        self.samples_per_step.append(self.samples_since_step)
        self.samples_since_step = 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.fixed_lr or self.lr)


def _trainer(*callbacks) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _state(*objects) -> list[set[str]]:
    return [set(vars(thing)) for thing in objects]


def _modes(model) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("source", ["dict", "stored study"])
def test_the_run_trains_micro_batch_times_accumulation_at_the_recommended_rate(tmp_path, caplog, source):
    if source == "dict":
        callback = AutobatchCallback(RECOMMENDED)
    else:
        storage = f"sqlite:///{tmp_path}/s.db"
        store_study(storage, "s")
        callback = AutobatchCallback(study_name="s", storage=storage)
    model, data = Model(), Data()
    model.frozen.eval()
    trainer = _trainer(callback)
    before, modes = _state(model, data, trainer), _modes(model)

    with caplog.at_level(logging.INFO, logger="autobatch.integrations.lightning"):
        trainer.fit(model, datamodule=data)

    micro, accumulation = RECOMMENDED["micro_batch_size"], RECOMMENDED["accumulation_steps"]
    assert model.batch_sizes == [micro] * (N_SAMPLES // micro)
    assert trainer.accumulate_grad_batches == accumulation
    assert model.samples_per_step == [micro * accumulation] * (N_SAMPLES // (micro * accumulation))
    assert trainer.global_step == N_SAMPLES // (micro * accumulation)
    assert trainer.optimizers[0].param_groups[0]["lr"] == RECOMMENDED["learning_rate"]
    assert data.batch_size == micro and model.lr == model.hparams.lr == RECOMMENDED["learning_rate"]
    assert callback.applied == {"batch_size": micro, "accumulate_grad_batches": accumulation, "lr": 0.03}
    # Nothing left behind: no new attribute on the module, the DataModule or the Trainer; modes as they were.
    assert _state(model, data, trainer) == before
    assert _modes(model) == modes and not model.frozen.training
    [line] = [record.getMessage() for record in caplog.records if record.name == "autobatch.integrations.lightning"]
    assert "DataModule.batch_size=4" in line and "Trainer.accumulate_grad_batches=3" in line
    assert "LightningModule.lr=0.03" in line and "LightningModule.hparams.lr=0.03" in line


def test_apply_recommendation_sets_a_built_trainer_and_changes_nothing_else():
    model, data = Model(), Data()
    model.eval()
    trainer = _trainer()
    before = _state(model, data, trainer)
    recommendation = Recommendation(micro_batch_size=8, accumulation_steps=2, learning_rate=0.5)

    applied = apply_recommendation(trainer, model, recommendation, datamodule=data)

    assert applied == {"batch_size": 8, "accumulate_grad_batches": 2, "lr": 0.5}
    assert (data.batch_size, trainer.accumulate_grad_batches, model.lr, model.hparams.lr) == (8, 2, 0.5, 0.5)
    assert _state(model, data, trainer) == before and not model.training


@pytest.mark.parametrize(
    ("kwargs", "parameter", "where"),
    [
        ({"batch_arg_name": "bs"}, "batch_arg_name='bs'", "no DataModule (or its hparams) or LightningModule"),
        ({"lr_attr_name": "learning_rate"}, "lr_attr_name='learning_rate'", "no LightningModule (or its hparams)"),
    ],
)
def test_a_missing_attribute_is_one_line_and_sets_nothing(kwargs, parameter, where):
    model, data, trainer = Model(), Data(), _trainer()
    with pytest.raises(InvalidParameterError) as error:
        apply_recommendation(trainer, model, RECOMMENDED, datamodule=data, **kwargs)
    assert str(error.value).startswith(parameter) and where in str(error.value) and "\n" not in str(error.value)
    assert (data.batch_size, trainer.accumulate_grad_batches, model.lr) == (32, 1, 0.1)


def test_accumulation_lightning_would_not_do_is_refused():
    model = Model()
    model.automatic_optimization = False
    with pytest.raises(InvalidParameterError, match="accumulation_steps=3 .*automatic_optimization=False"):
        apply_recommendation(_trainer(), model, RECOMMENDED, datamodule=Data())
    scheduled = _trainer(pl.callbacks.GradientAccumulationScheduler({0: 2}))
    with pytest.raises(InvalidParameterError, match="resets accumulate_grad_batches every epoch"):
        apply_recommendation(scheduled, Model(), RECOMMENDED, datamodule=Data())


def test_a_loader_that_ignores_the_batch_size_stops_the_run():
    model, data = Model(), Data(fixed_batch_size=8)
    with pytest.raises(AutobatchError, match="batches 8 samples, not the recommended micro-batch 4"):
        _trainer(AutobatchCallback(RECOMMENDED)).fit(model, datamodule=data)
    assert model.batch_sizes == []


def test_an_optimizer_that_ignores_the_rate_is_reported(caplog):
    model = Model(fixed_lr=0.2)
    with caplog.at_level(logging.WARNING, logger="autobatch.integrations.lightning"):
        _trainer(AutobatchCallback(RECOMMENDED)).fit(model, datamodule=Data())
    assert "learning rate is 0.2, not the recommended 0.03: does configure_optimizers() read self.lr?" in caplog.text
