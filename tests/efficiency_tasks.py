"""Small tasks for the efficiency tests: linear regression whose gradient noise is known in closed form,
a small classification task that trains in a fraction of a second, and a backend of closed-form curves
that measures its gradient noise on the linear regression's data."""

from __future__ import annotations

import math

import numpy as np

from autobatch.backends.base import Backend, TrialMeasurements
from autobatch.core.schedule import report_intermediate
from autobatch.tasks.workload import Workload

DIMENSIONS = 8
NOISE_VARIANCE = 4.0
TARGET_WEIGHTS = np.full(DIMENSIONS, 1.0 / np.sqrt(DIMENSIONS))  # |w*| = 1
#: B_simple at w = 0, from the closed form above: 9 + 32 = 41
TRUE_NOISE_SCALE = ((DIMENSIONS + 1) * 1.0 + DIMENSIONS * NOISE_VARIANCE) / 1.0
#: small enough that SGD leaves w at 0 over a trial: the noise scale stays the one above
FROZEN_LEARNING_RATE = 1e-9


def linear_regression() -> Workload:
    """Data x ~ N(0, I_d), y = w*·x + ε with ε ~ N(0, σ²); model y = w·x; loss: mean squared error.

    A sample's gradient is 2(w·x − y)x = 2(x xᵀ δ − ε x) with δ = w − w*, so

        G = E[gradient] = 2δ,    tr(Σ) = 4((d + 1)|δ|² + d σ²)    (Gaussian fourth moments)

    and B_simple = tr(Σ)/|G|² = ((d + 1)|δ|² + d σ²)/|δ|². The models start at w = 0
    (δ = −w*), and the tests train at a learning rate so small that w stays there.
    """
    rng = np.random.default_rng(7)
    n_train, n_val = 16384, 1024
    x = rng.normal(size=(n_train + n_val, DIMENSIONS)).astype(np.float32)
    noise = rng.normal(scale=np.sqrt(NOISE_VARIANCE), size=n_train + n_val)
    y = (x @ TARGET_WEIGHTS + noise).astype(np.float32)
    return Workload(
        name="linear-regression",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_val=x[n_train:],
        y_val=y[n_train:],
        models={"torch": _torch_linear, "tensorflow": _keras_linear},
        loss="mse",
        optimizer="sgd",
        base_batch_size=16,
        base_learning_rate=0.01,
        description="linear regression, closed-form gradient noise",
    )


def _torch_linear():
    import torch

    model = torch.nn.Linear(DIMENSIONS, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    return model


def _keras_linear():
    import keras

    return keras.Sequential(
        [keras.Input((DIMENSIONS,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )


def blobs() -> Workload:
    """A small classification task whose trials take well under a second: four Gaussian blobs in 16-D.

    The classes overlap, so the validation loss keeps falling for a while and a good
    learning rate and batch size show; the MLP is small enough that a time-budgeted
    trial takes thousands of steps on one CPU thread.
    """
    rng = np.random.default_rng(11)
    classes, dimensions, n_train, n_val = 4, 16, 4096, 1024
    centres = rng.normal(scale=0.6, size=(classes, dimensions))
    y = rng.integers(0, classes, size=n_train + n_val)
    x = (centres[y] + rng.normal(size=(n_train + n_val, dimensions))).astype(np.float32)
    return Workload(
        name="blobs",
        x_train=x[:n_train],
        y_train=y[:n_train].astype(np.int64),
        x_val=x[n_train:],
        y_val=y[n_train:].astype(np.int64),
        models={"torch": _torch_mlp, "tensorflow": _keras_mlp},
        loss="cross_entropy",
        optimizer="adam",
        base_batch_size=32,
        base_learning_rate=1e-3,
        description="4 Gaussian blobs in 16-D, MLP 16-64-4",
    )


def _torch_mlp():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def _keras_mlp():
    import keras

    return keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(4)])


# --- a backend with closed-form learning curves, for the study's objectives and pruners -------------

CURVE_BASE_BYTES = 40 * 2**20
CURVE_PER_SAMPLE_BYTES = 2**20
#: the critical batch the learning curves obey (how fast they learn); the gradient noise a trial
#: reports is measured, from the workload's data (see :func:`measured_gradient_noise`)
CURVE_NOISE_SCALE = 48.0


def curve_throughput(micro: int, accumulation: int) -> float:
    """Bigger micro-batches use the device better; accumulation costs a little per window."""
    return 5000.0 * micro / (micro + 48) * (1.0 - 0.04 * (accumulation - 1) / accumulation)


def curve_loss(micro: int, accumulation: int, learning_rate: float, samples: float) -> float:
    """Validation loss after ``samples`` samples: progress per sample falls past the noise scale
    (McCandlish et al.), and a learning rate off the square-root rule's slows it down."""
    batch = micro * accumulation
    best_lr = 1e-3 * math.sqrt(batch / 32)
    lr_quality = math.exp(-2.0 * math.log10(learning_rate / best_lr) ** 2)
    steps_worth = samples / (batch + CURVE_NOISE_SCALE) * lr_quality  # base-batch steps' worth of progress
    return 0.3 + 2.0 * math.exp(-steps_worth / 40.0)


def curve_loss_within(micro: int, accumulation: int, learning_rate: float, seconds: float) -> float:
    return curve_loss(micro, accumulation, learning_rate, curve_throughput(micro, accumulation) * seconds)


class CurveBackend(Backend):
    """Throughput, learning curve and noise scale in closed form; memory is real (touched numpy bytes).

    A time-budgeted trial reports its curve at the evaluation points through the same
    progress object as a real backend, so the worker, the study and Optuna's pruner
    handle it for real; only the training is a formula, and no time passes in it.
    """

    name = "curve"

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        pass

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)

    def run_trial(self, workload, config, budget, device, progress) -> TrialMeasurements:
        progress.mark_baseline()
        progress.phase = "train"
        held = np.ones(CURVE_BASE_BYTES + CURVE_PER_SAMPLE_BYTES * config.micro_batch_size, dtype=np.uint8)
        del held
        micro, accumulation, lr = config.micro_batch_size, config.accumulation_steps, config.learning_rate
        extras: dict = {}
        if accumulation > 1 and budget.measure_noise:
            extras["gradient_noise"] = measured_gradient_noise(workload, micro, accumulation)
        trained = budget.train_samples
        if budget.train_seconds is None and budget.evaluation_fractions:
            # Toward a horizon: evaluated at shares of the trial's samples, reported in thousandths of it.
            intermediate = []
            for share in budget.evaluation_fractions:
                trained = math.ceil(budget.train_samples * share)
                seconds = trained / curve_throughput(micro, accumulation)
                loss = curve_loss(micro, accumulation, lr, trained)
                step = round(1000 * share)
                intermediate.append({"step": step, "train_seconds": seconds, "samples": trained, "val_loss": loss})
                if share < 1.0 and report_intermediate(progress, step, loss, seconds):
                    extras["pruned"] = True
                    break
            extras["intermediate_losses"] = intermediate
        elif budget.train_seconds is None:
            loss = curve_loss(micro, accumulation, lr, budget.train_samples)
        else:
            intermediate = []
            for step in range(1, budget.evaluations + 1):
                seconds = budget.train_seconds * step / budget.evaluations
                loss = curve_loss_within(micro, accumulation, lr, seconds)
                intermediate.append({"step": step, "train_seconds": seconds, "val_loss": loss})
                if step < budget.evaluations and report_intermediate(progress, step, loss, seconds):
                    extras["pruned"] = True
                    break
            extras["intermediate_losses"] = intermediate
        progress.phase = "eval"
        return TrialMeasurements(
            samples_per_second=curve_throughput(micro, accumulation),
            val_loss=loss,
            samples_trained=trained,
            steps_timed=1,
            extras=extras,
        )


def measured_gradient_noise(workload: Workload, micro: int, accumulation: int) -> dict:
    """The gradient noise of one pass over the workload's training split, as a backend measures it.

    The data is :func:`linear_regression`'s and the curve "model" stays at w = 0, where a
    sample's gradient of the squared error is −2yx: each micro-batch's mean gradient and each
    window's go through autobatch's own estimator. Its B_simple is therefore an estimate of
    :data:`TRUE_NOISE_SCALE` (41) with the estimator's error, not a number this module states.
    """
    from autobatch.core.noise import NoiseScaleEstimator

    x = np.asarray(workload.x_train, dtype=np.float64)
    y = np.asarray(workload.y_train, dtype=np.float64)
    gradients = -2.0 * y[:, None] * x
    window = micro * accumulation
    estimator = NoiseScaleEstimator()
    for start in range(0, len(gradients) - window + 1, window):
        micro_means = gradients[start : start + window].reshape(accumulation, micro, -1).mean(axis=1)
        micro_sq_norm = float(np.mean(np.sum(micro_means**2, axis=1)))
        window_sq_norm = float(np.sum(micro_means.mean(axis=0) ** 2))
        estimator.add_window(micro, window, micro_sq_norm, window_sq_norm)
    return estimator.summary()


def curve_workload() -> Workload:
    """Linear regression's data (the curves' noise is measured on it); the curves themselves are formulas."""
    data = linear_regression()
    return Workload(
        name="curves",
        x_train=data.x_train,
        y_train=data.y_train,
        x_val=data.x_val,
        y_val=data.y_val,
        models={"curve": lambda: None},
        base_batch_size=32,
        base_learning_rate=1e-3,
    )
