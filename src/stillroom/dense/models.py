"""A small fully-convolutional encoder-decoder (U-Net-like, plain torch): the dense family of
the model layer (`kind: fcn`), for segmentation logits and CenterNet-style detection heads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FCN(nn.Module):
    """(N, C_in, H, W) -> (N, num_outputs, H / output_stride, W / output_stride).

    Encoder `stages.i` halves the resolution after the first (widths `channels`); decoder
    `ups.j` doubles it back, concatenating the encoder map of that size (a skip connection),
    until the output stride is reached; `head` is a 1x1 conv. Tap names: stages.i, ups.j, head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: list[int],
        num_outputs: int,
        output_stride: int = 1,
    ) -> None:
        super().__init__()
        levels = len(channels)
        deepest = 2 ** (levels - 1)
        if len(input_shape) != 3:
            raise StillroomError(
                f"model kind fcn takes images (C, H, W), but the data's inputs are {input_shape}"
            )
        if output_stride not in [2**i for i in range(levels)]:
            raise StillroomError(
                f"fcn output_stride {output_stride} must be a power of 2 up to {deepest} "
                f"(2 ** (len(channels) - 1))"
            )
        if input_shape[1] % deepest or input_shape[2] % deepest:
            raise StillroomError(
                f"fcn with {levels} channel stages halves the image {levels - 1} times: its size "
                f"{input_shape[1]}x{input_shape[2]} must be a multiple of {deepest}; change "
                "channels or the canvas size"
            )
        self.stages = nn.ModuleList(
            _block(channels[i - 1] if i else input_shape[0], c, 1 if i == 0 else 2)
            for i, c in enumerate(channels)
        )
        ups = levels - 1 - (output_stride.bit_length() - 1)
        self.ups = nn.ModuleList(
            _block(channels[levels - 1 - j] + channels[levels - 2 - j], channels[levels - 2 - j], 1)
            for j in range(ups)
        )
        width = channels[levels - 1 - ups]
        self.head = nn.Conv2d(width, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        for j, up in enumerate(self.ups):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = up(torch.cat([x, skips[len(skips) - 2 - j]], dim=1))
        return self.head(x)


def build_fcn(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    channels = list(spec.get("channels", [16, 32, 64]))
    if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
        raise StillroomError(f"fcn channels must be positive widths, got {channels}")
    return FCN(input_shape, channels, num_outputs, int(spec.get("output_stride", 1)))
