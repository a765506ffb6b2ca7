"""Keras 3 models of the ready-made studies: the same layers and parameter counts as ``torch_models``.

The data is stored channels-first (N, C, H, W), as PyTorch wants it; the conv models
start with a ``Permute`` to channels-last, which TensorFlow's CPU convolutions need.
Weights start from PyTorch's default initialisation (uniform in ±1/√fan_in for kernels
and biases), so both frameworks begin their trials from comparable models.
"""

from __future__ import annotations

import math

import keras
from keras import layers


def digits_mlp() -> keras.Model:
    inputs = keras.Input(shape=(64,), name="pixels")
    x = _dense(128, fan_in=64, activation="relu")(inputs)
    x = _dense(64, fan_in=128, activation="relu")(x)
    outputs = _dense(10, fan_in=64)(x)
    return keras.Model(inputs, outputs, name="digits_mlp")


def digits_cnn() -> keras.Model:
    inputs = keras.Input(shape=(1, 8, 8), name="pixels")
    x = layers.Permute((2, 3, 1))(inputs)  # (N, 1, 8, 8) -> (N, 8, 8, 1)
    x = _conv(16, in_channels=1, activation="relu")(x)
    x = _conv(32, in_channels=16, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = _dense(64, fan_in=32 * 4 * 4, activation="relu")(x)
    outputs = _dense(10, fan_in=64)(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def synthetic_cnn() -> keras.Model:
    inputs = keras.Input(shape=(3, 64, 64), dtype="uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255.0)(inputs)  # uint8 -> float in [0, 1], like torch's ScaleToUnit
    # Transposed after the cast: oneDNN has no uint8 transpose on most CPUs and logs an error for it.
    x = layers.Permute((2, 3, 1))(x)
    x = _conv(16, in_channels=3, activation="relu")(x)
    x = _conv(16, in_channels=16, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = _conv(32, in_channels=16, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = _conv(64, in_channels=32, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = _dense(10, fan_in=64)(x)
    return keras.Model(inputs, outputs, name="synthetic_cnn")


def _dense(units: int, fan_in: int, activation: str | None = None) -> layers.Dense:
    kernel, bias = _torch_default_init(fan_in)
    return layers.Dense(units, activation=activation, kernel_initializer=kernel, bias_initializer=bias)


def _conv(filters: int, in_channels: int, activation: str | None = None, kernel_size: int = 3) -> layers.Conv2D:
    kernel, bias = _torch_default_init(in_channels * kernel_size * kernel_size)
    return layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        activation=activation,
        kernel_initializer=kernel,
        bias_initializer=bias,
    )


def _torch_default_init(fan_in: int) -> tuple[keras.initializers.Initializer, keras.initializers.Initializer]:
    """PyTorch's nn.Linear/nn.Conv2d defaults: kaiming_uniform(a=√5) kernel and uniform bias, both ±1/√fan_in."""
    bound = 1.0 / math.sqrt(fan_in)
    kernel = keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")
    return kernel, keras.initializers.RandomUniform(-bound, bound)
