"""synthetic-images: 3×64×64 classification whose activation memory grows with the batch.

The images are stored as uint8 (12 KiB each) so the data costs little of the
memory budget: the budget is spent on activations, which is what the micro-batch
controls. Each class paints a 16×16 patch of its own colour at a random place over
noise: a signal that survives global pooling, which a small CNN learns in a few
hundred steps.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from autobatch.tasks.workload import Workload

N_CLASSES = 10
IMAGE_SHAPE = (3, 64, 64)
TRAIN_SAMPLES = 2048
VAL_SAMPLES = 512
PATCH = 16


# One colour per class, far apart in RGB.
PALETTE = np.array(
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 255],
        [255, 255, 255],
        [255, 128, 0],
        [128, 0, 255],
        [0, 128, 128],
    ],
    dtype=np.uint8,
)


@lru_cache(maxsize=1)
def synthetic_split(seed: int = 1234) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return patch_images(TRAIN_SAMPLES, VAL_SAMPLES, IMAGE_SHAPE, PATCH, noise_below=96, seed=seed)


def patch_images(
    train: int, val: int, image_shape: tuple[int, int, int], patch: int, noise_below: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): uint8 (N, C, H, W) noise under ``noise_below``, each image with a
    ``patch``-square of its class's :data:`PALETTE` colour at a random place."""
    rng = np.random.default_rng(seed)
    total = train + val
    size = image_shape[1]
    labels = rng.integers(0, N_CLASSES, size=total).astype(np.int64)
    images = rng.integers(0, noise_below, size=(total, *image_shape), dtype=np.uint8)
    tops = rng.integers(0, size - patch, size=total)
    lefts = rng.integers(0, size - patch, size=total)
    rows = tops[:, None] + np.arange(patch)[None, :]  # (total, patch)
    cols = lefts[:, None] + np.arange(patch)[None, :]
    sample = np.arange(total)[:, None, None, None]
    channel = np.arange(3)[None, :, None, None]
    colours = PALETTE[labels][:, :, None, None]  # (total, 3, 1, 1)
    images[sample, channel, rows[:, None, :, None], cols[:, None, None, :]] = colours
    return images[:train], labels[:train], images[train:], labels[train:]


def synthetic_images() -> Workload:
    x_train, y_train, x_val, y_val = synthetic_split()
    return Workload(
        name="synthetic-images",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        models={
            "torch": "autobatch.studies.torch_models:synthetic_cnn",
            "tensorflow": "autobatch.studies.keras_models:synthetic_cnn",
        },
        loss="cross_entropy",
        optimizer="adam",
        base_batch_size=32,
        base_learning_rate=1e-3,
        description="CNN conv16-conv16-pool-conv32-pool-conv64-GAP-dense10 on uint8 3x64x64 (N,C,H,W) images",
    )
