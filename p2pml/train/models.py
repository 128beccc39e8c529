"""Model builders: the torch networks a node can train, by name."""

from __future__ import annotations

import math
from typing import Final

import torch
from torch import nn

from p2pml.errors import ConfigError

__all__ = ["MODELS", "build_model"]

MODELS: Final = ("mlp", "cnn")

_CNN_CHANNELS: Final = 32
_CNN_KERNEL: Final = 5
_CNN_POOL: Final = 2
_CNN_DROPOUT: Final = 0.1
_CNN_HIDDEN: Final = 1024
# The smallest side that leaves at least one pixel after the convolution and the pooling.
_CNN_MIN_SIDE: Final = _CNN_KERNEL - 1 + _CNN_POOL


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    seed: int | None = None,
    hidden: int = 128,
) -> nn.Module:
    """Build a classifier that maps a batch of `input_shape` samples to `n_classes` logits.

    Args:
        name: One of `MODELS`: `mlp` (one hidden layer of `hidden` units) or `cnn` (the PSP
            experiment's network: conv 5×5×32, max-pool 2, dropout 0.1, fc 1024, linear).
        input_shape: Shape of one sample, e.g. (1, 28, 28); `cnn` needs (channels, H, W).
        n_classes: Number of output logits (≥ 1).
        seed: When given, the initial parameters depend on it alone; the caller's global torch
            RNG state is left untouched.
        hidden: Width of the `mlp`'s hidden layer.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ConfigError: Unknown name, a shape the model cannot take, or bad sizes.
    """
    if name not in MODELS:
        raise ConfigError("model", name, "one of " + ", ".join(MODELS))
    if not input_shape or any(d < 1 for d in input_shape):
        raise ConfigError("input_shape", input_shape, "a non-empty shape of positive sizes")
    if n_classes < 1:
        raise ConfigError("n_classes", n_classes, "an int ≥ 1")
    if hidden < 1:
        raise ConfigError("hidden", hidden, "an int ≥ 1")
    if name == "cnn" and (len(input_shape) != 3 or min(input_shape[1:]) < _CNN_MIN_SIDE):
        raise ConfigError("model", name, "mlp for a data set of flat features such as iris")
    if seed is None:
        return _build(name, input_shape, n_classes, hidden)
    # Parameter initialisation draws from the default CPU generator. fork_rng restores it on
    # exit; seeding that generator alone (not torch.manual_seed, which also seeds every CUDA
    # device) keeps the caller's RNG state untouched on every device.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return _build(name, input_shape, n_classes, hidden)


def _build(name: str, input_shape: tuple[int, ...], n_classes: int, hidden: int) -> nn.Module:
    if name == "mlp":
        return _mlp(input_shape, n_classes, hidden)
    return _cnn(input_shape, n_classes)


def _mlp(input_shape: tuple[int, ...], n_classes: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def _cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    channels, height, width = input_shape
    pooled_h = (height - _CNN_KERNEL + 1) // _CNN_POOL
    pooled_w = (width - _CNN_KERNEL + 1) // _CNN_POOL
    return nn.Sequential(
        nn.Conv2d(channels, _CNN_CHANNELS, kernel_size=_CNN_KERNEL),
        nn.ReLU(),
        nn.MaxPool2d(_CNN_POOL),
        nn.Dropout(_CNN_DROPOUT),
        nn.Flatten(),
        nn.Linear(_CNN_CHANNELS * pooled_h * pooled_w, _CNN_HIDDEN),
        nn.ReLU(),
        nn.Linear(_CNN_HIDDEN, n_classes),
    )
