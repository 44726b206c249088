"""A small convolutional network for image inputs, the default teacher for the image demos."""

from __future__ import annotations

import math

import torch
from torch import nn

from stillroom.models.mlp import dense_stack


class SmallCNN(nn.Module):
    """[Conv3x3 -> BatchNorm -> ReLU -> (MaxPool2 while the map is > 4 px)] per channel entry,
    then [Linear -> ReLU -> Dropout] per hidden width, and the output head.

    Args:
        input_shape: (channels, height, width) of one sample; flat inputs of that many features are
            reshaped, so the same data tensors serve MLPs and CNNs.
        channels: output channels of each conv block.
        hidden: widths of the fully connected layers before the head.
        num_outputs: number of classes (or regression outputs).
        dropout: dropout before the head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: list[int],
        hidden: list[int],
        num_outputs: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"cnn needs image inputs (channels, height, width), got input shape {input_shape}; "
                "use kind: mlp for flat features"
            )
        self.input_shape = tuple(input_shape)
        in_ch, height, width = input_shape
        blocks: list[nn.Module] = []
        for out_ch in channels:
            blocks += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
            ]
            if min(height, width) > 4:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = dense_stack(in_ch * height * width, hidden, num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, F) flat features -> (N, C, H, W) images when F == C * H * W
        if x.dim() == 2 and x.shape[1] == math.prod(self.input_shape):
            x = x.view(x.shape[0], *self.input_shape)
        return self.head(self.features(x))
