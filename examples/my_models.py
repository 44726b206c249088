"""Your own models, named in a recipe as `factory: my_models:<function>` (see recipes/own_*.yaml).

stillroom calls the function with the recipe's `kwargs`, adding `input_shape` (one sample's shape)
and `num_outputs` (classes, or regression targets) because these functions declare them.
"""

from __future__ import annotations

import math

from torch import nn


def tiny_convnet(channels: int, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A two-layer convolutional student for (C, H, W) images."""
    in_channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_outputs),
    )


def wide_and_shallow(width: int, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """One wide hidden layer with layer norm, for feature vectors (tables)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Linear(width, num_outputs),
    )
