"""Multi-layer perceptron family: the default student, and a teacher for tabular data."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

    Args:
        input_shape: shape of one input sample, e.g. (64,) or (1, 8, 8); it is flattened.
        hidden: widths of the hidden layers; [] gives a linear model.
        num_outputs: number of classes (or regression outputs).
        dropout: dropout probability after each hidden layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden: list[int],
        num_outputs: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
