"""A ResNet with an early exit after every stage but the last: the network of self-distillation.

Zhang et al. 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks
via Self Distillation" (arXiv:1905.08094), fig. 2: the backbone is cut into sections; after each
shallow section a "bottleneck" (convolutions that bring the map to the deepest section's resolution
and, by default, its width) feeds a pooled feature and a linear classifier. Every exit is a whole
classifier on its own: `exit_model` cuts out the part that runs up to one exit, the network you
deploy when that exit's accuracy is enough.

Module names (stable, for feature taps; K = len(widths), exits 1..K-1, then "final"):

    stem                  (N, widths[0], H, W)
    stages.i              (N, widths[i], H_i, W_i)   as in stillroom.models.ResNet
    exits.i.bottleneck    (N, exit_width, H_K, W_K)  exit i+1's map, at the deepest resolution
    exits.i.features      (N, exit_width)            exit i+1's pooled feature
    exits.i.head          (N, num_outputs)           exit i+1's logits
    pool                  (N, widths[-1])            the deepest pooled feature
    head                  (N, num_outputs)           the final logits

forward(x) -> {"exit1": (N, C), ..., "exit{K-1}": (N, C), "final": (N, C)}, in that order.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.models.resnet import ResNet

FINAL = "final"
"""The name of the deepest exit, the teacher of the others."""


def exit_names(num_stages: int) -> list[str]:
    """Exit names of a network with `num_stages` stages: exit1 .. exit{K-1}, final."""
    return [f"exit{i}" for i in range(1, num_stages)] + [FINAL]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> list[nn.Module]:
    # no conv bias: the BatchNorm right after it has its own shift
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    ]


class ExitBranch(nn.Module):
    """bottleneck -> features -> head: the classifier hung on one shallow stage.

    bottleneck: a 1x1 conv to `width` channels, then one 3x3 conv per halving the later stages do
    (stride 2; a stride-1 3x3 when they do none), so the exit's map (N, width, H_K, W_K) matches the
    deepest stage's resolution and can be hinted toward it (the paper's bottleneck layers).
    features: global average pool to (N, width). head: Linear(width, num_outputs).
    """

    def __init__(self, in_ch: int, width: int, halvings: int, num_outputs: int) -> None:
        super().__init__()
        layers = _conv_bn_relu(in_ch, width, 1, 1)
        for _ in range(max(halvings, 1)):
            layers += _conv_bn_relu(width, width, 3, 2 if halvings > 0 else 1)
        self.bottleneck = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_ch, H_i, W_i) -> (N, num_outputs)."""
        return self.head(self.features(self.bottleneck(x)))


class MultiExitResNet(nn.Module):
    """stillroom.models.ResNet with an `ExitBranch` after every stage but the last.

    Args:
        input_shape, widths, blocks, num_outputs, min_size: as for `ResNet`; the trunk (stem,
            stages, pool, head) is exactly that ResNet, with the same parameter names, so the
            "final" exit alone is a plain ResNet (see `exit_model`).
        exit_width: channels of every exit's bottleneck; None = widths[-1], the deepest width, so
            feature hints need no projector (as in the paper).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        widths: list[int],
        blocks: list[int] | int,
        num_outputs: int,
        exit_width: int | None = None,
        min_size: int = 4,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if len(widths) < 2:
            raise StillroomError(
                f"a multi-exit network needs at least 2 stages (one exit after each but the last), "
                f"got widths {widths}"
            )
        if exit_width is not None and exit_width < 1:
            raise StillroomError(f"exit_width must be a positive channel count, got {exit_width}")
        # composition: the trunk is built by ResNet itself, then its parts are adopted by name
        trunk = ResNet(input_shape, widths, blocks, num_outputs, min_size)
        self.input_shape = tuple(input_shape)
        self.widths, self.blocks, self.min_size = widths, blocks, min_size
        self.num_outputs = num_outputs
        self.exit_width = exit_width or widths[-1]
        self.stem, self.stages, self.pool, self.head = (
            trunk.stem,
            trunk.stages,
            trunk.pool,
            trunk.head,
        )
        halves = [stage[0].conv1.stride[0] == 2 for stage in self.stages]
        self.exits = nn.ModuleList(
            ExitBranch(widths[i], self.exit_width, sum(halves[i + 1 :]), num_outputs)
            for i in range(len(widths) - 1)
        )
        self.names = exit_names(len(widths))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) or flat (N, C*H*W) -> {exit name: (N, num_outputs)}, shallowest first."""
        if x.dim() == 2 and x.shape[1] == math.prod(self.input_shape):
            x = x.view(x.shape[0], *self.input_shape)
        x = self.stem(x)
        outputs = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.exits):
                outputs[self.names[i]] = self.exits[i](x)
        outputs[FINAL] = self.head(self.pool(x))
        return outputs

    def feature_layers(self, kind: str = "pooled") -> tuple[dict[str, str], str]:
        """({shallow exit: its feature layer}, the deepest feature layer) for hint terms.

        kind "pooled": exits.i.features (N, exit_width) -> pool (N, widths[-1]);
        kind "map": exits.i.bottleneck (N, exit_width, H_K, W_K) -> stages.{K-1} (N, widths[-1], H_K, W_K).
        """
        if kind == "pooled":
            return {n: f"exits.{i}.features" for i, n in enumerate(self.names[:-1])}, "pool"
        if kind == "map":
            deepest = f"stages.{len(self.stages) - 1}"
            return {n: f"exits.{i}.bottleneck" for i, n in enumerate(self.names[:-1])}, deepest
        raise StillroomError(f"feature kind must be 'pooled' or 'map', got {kind!r}")


class ExitNetwork(nn.Module):
    """The part of a multi-exit network that one shallow exit needs: stem, stages 0..i, exit i.

    forward(x): (N, C, H, W) or flat (N, C*H*W) -> (N, num_outputs), a plain tensor, so
    `stillroom.export.export_model` and `stillroom.measure` take it like any classifier.
    """

    def __init__(
        self, input_shape: tuple[int, ...], stem: nn.Module, stages: nn.Sequential, exit_: nn.Module
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem, self.stages, self.exit = stem, stages, exit_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[1] == math.prod(self.input_shape):
            x = x.view(x.shape[0], *self.input_shape)
        return self.exit(self.stages(self.stem(x)))


def _check_exit(model: nn.Module, name: str) -> None:
    if not isinstance(model, MultiExitResNet):
        raise StillroomError(
            f"exit_model cuts exits out of a MultiExitResNet, got {type(model).__name__}"
        )
    if name not in model.names:
        raise StillroomError(
            f"the network has no exit {name!r}; its exits are: {', '.join(model.names)}"
        )


def exit_model(model: MultiExitResNet, name: str) -> nn.Module:
    """A standalone copy of what exit `name` runs: its forward returns that exit's (N, C) logits,
    equal to `model(x)[name]`. The copy shares no parameters with `model`.

    "final" is a plain `ResNet` (the trunk without the exit branches); "exit{k}" an `ExitNetwork`
    with stem, stages 0..k-1 and exit branch k-1 (later stages and exits are not run at all).
    """
    _check_exit(model, name)
    if name == FINAL:
        plain = ResNet(
            model.input_shape, model.widths, model.blocks, model.num_outputs, model.min_size
        )
        trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("exits.")}
        plain.load_state_dict(trunk)
        return plain.train(model.training)
    k = model.names.index(name) + 1
    part = ExitNetwork(
        model.input_shape,
        copy.deepcopy(model.stem),
        copy.deepcopy(model.stages[:k]),
        copy.deepcopy(model.exits[k - 1]),
    )
    return part.train(model.training)


def build_multiexit(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """The MODELS builder of kind "multiexit": {"kind": "multiexit", "widths": [...], "blocks":
    [...] or int, "exit_width": int or null, "exit": null or an exit name}. With "exit", the
    standalone network of that exit (`exit_model`), so `load_model` rebuilds a saved exit."""
    blocks = spec.get("blocks", 1)
    model = MultiExitResNet(
        input_shape,
        list(spec.get("widths", [16, 32, 64])),
        blocks if isinstance(blocks, int) else list(blocks),
        num_outputs,
        spec.get("exit_width"),
    )
    name = spec.get("exit")
    return model if name is None else exit_model(model, name)
