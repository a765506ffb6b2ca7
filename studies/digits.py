"""scikit-learn's bundled 8×8 digits (no download), split 80/20, stratified."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from autobatch.tasks.workload import Workload

VALIDATION_SHARE = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): pixels scaled to [0, 1] as float32, labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=VALIDATION_SHARE, stratify=y, random_state=SPLIT_SEED))  # type: ignore[return-value]


def digits_mlp() -> Workload:
    x_train, x_val, y_train, y_val = digits_split()
    return Workload(
        name="digits-mlp",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        models={
            "torch": "autobatch.studies.torch_models:digits_mlp",
            "tensorflow": "autobatch.studies.keras_models:digits_mlp",
        },
        loss="cross_entropy",
        optimizer="adam",
        base_batch_size=32,
        base_learning_rate=1e-3,
        description="MLP 64-128-64-10 on sklearn digits",
    )


def digits_cnn() -> Workload:
    x_train, x_val, y_train, y_val = digits_split()
    return Workload(
        name="digits-cnn",
        x_train=x_train.reshape(-1, 1, 8, 8),
        y_train=y_train,
        x_val=x_val.reshape(-1, 1, 8, 8),
        y_val=y_val,
        models={
            "torch": "autobatch.studies.torch_models:digits_cnn",
            "tensorflow": "autobatch.studies.keras_models:digits_cnn",
        },
        loss="cross_entropy",
        optimizer="adam",
        base_batch_size=32,
        base_learning_rate=1e-3,
        description="two 3x3 conv layers (16, 32), max-pool, dense 64, on sklearn digits (N,1,8,8)",
    )
