"""A small ResNet family (He et al. 2016, "Deep Residual Learning") for teachers and students.

Plain torch, sized for small images (8x8 digits, 28x28 MNIST, 32x32 CIFAR): a stride-1 stem,
stages of BasicBlocks that halve the map between stages while it is larger than `min_size`,
global average pooling and a linear head. Its parts have stable names for feature taps:

    stem        (N, widths[0], H, W)
    stages.i    (N, widths[i], H_i, W_i)   output of stage i; stages.i.j is block j of stage i
    pool        (N, widths[-1])            globally averaged features
    head        (N, num_outputs)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stillroom.errors import StillroomError


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> list[nn.Module]:
    # no conv bias: the BatchNorm right after it has its own shift
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), both convs 3x3.

    The shortcut is the identity when shapes match, else a strided 1x1 conv + BatchNorm that
    projects (N, in_ch, H, W) to (N, out_ch, H', W'). Every op is out of place, so a tapped block
    output is never overwritten by the next block.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_ch, out_ch, 3, stride)
        self.act1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(out_ch, out_ch, 3, 1)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))
        )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(residual + self.shortcut(x))


class ResNet(nn.Module):
    """stem [Conv3x3 -> BN -> ReLU] -> stages of BasicBlocks -> global average pool -> Linear.

    Args:
        input_shape: (channels, height, width) of one sample; flat inputs of that many features
            are reshaped, so the same data tensors serve MLPs and CNNs.
        widths: channels of each stage; the stem has widths[0].
        blocks: BasicBlocks per stage, one entry per width, or one int for every stage.
            Depth (weighted layers) is 2 * sum(blocks) + 2.
        num_outputs: number of classes (or regression outputs).
        min_size: a stage after the first halves the map (stride 2) only while the smaller
            side is larger than this, so 8x8 digits go 8 -> 4 and 28x28 MNIST 28 -> 14 -> 7 -> 4.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        widths: list[int],
        blocks: list[int] | int,
        num_outputs: int,
        min_size: int = 4,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise StillroomError(
                f"resnet needs image inputs (channels, height, width), got input shape "
                f"{tuple(input_shape)}; use kind: mlp for flat features"
            )
        widths = list(widths)
        blocks = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
        if not widths or any(w < 1 for w in widths):
            raise StillroomError(f"resnet widths must be positive channel counts, got {widths}")
        if len(blocks) != len(widths) or any(b < 1 for b in blocks):
            raise StillroomError(
                f"resnet blocks must give at least 1 block for each of the {len(widths)} stages "
                f"in widths {widths}, got {blocks}"
            )
        self.input_shape = tuple(input_shape)
        in_ch, height, width = input_shape
        # stride-1 stem: these images are too small to lose resolution before the first stage
        self.stem = nn.Sequential(*_conv_bn(in_ch, widths[0], 3, 1), nn.ReLU())
        stages: list[nn.Module] = []
        ch = widths[0]
        for index, (out_ch, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 2 if index > 0 and min(height, width) > min_size else 1
            if stride == 2:
                # a 3x3 conv with padding 1 and stride 2 maps s pixels to ceil(s / 2)
                height, width = (height + 1) // 2, (width + 1) // 2
            stage = [BasicBlock(ch, out_ch, stride)]
            stage += [BasicBlock(out_ch, out_ch) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.feature_size = (height, width)  # (H, W) of the last stage's map
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(ch, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) or flat (N, C*H*W) -> (N, num_outputs)."""
        if x.dim() == 2 and x.shape[1] == math.prod(self.input_shape):
            x = x.view(x.shape[0], *self.input_shape)
        return self.head(self.pool(self.stages(self.stem(x))))
