"""Multi-layer perceptron family: the default student, and a teacher for tabular data."""

from __future__ import annotations

import math

import torch
from torch import nn


def dense_stack(
    in_features: int, hidden: list[int], num_outputs: int, dropout: float
) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear(num_outputs)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


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
        self.net = dense_stack(math.prod(input_shape), hidden, num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
