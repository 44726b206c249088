"""Multi-task networks: one shared trunk, one named head per task; `forward` returns a dict.

Hard parameter sharing (Caruana 1997, "Multitask Learning"): every task reads the same trunk
features, so what one task's labels (or a teacher's soft targets) teach the trunk is available to
the others. The spec a `model.json` stores:

    {"kind": "multitask", "trunk": "mlp" | "cnn", "hidden": [64], "channels": [32, 64],
     "dropout": 0.0, "head_hidden": [], "heads": {"digit": ["classification", 10],
                                                  "slant": ["regression", 1]}}

`hidden` are the trunk's fully connected widths (the last one is the feature width every head
reads); `channels` the conv blocks of a `cnn` trunk (a SmallCNN body); `head_hidden` the widths of
each head's own hidden layers ([] = a linear head).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.models.cnn import SmallCNN
from stillroom.models.mlp import MLP, dense_stack

HEAD_KINDS = ("classification", "regression")
TRUNKS = ("mlp", "cnn")
HEAD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
"""Head (task) names: identifiers, since they become module names and metric keys."""


class MultiTaskNet(nn.Module):
    """A shared trunk and one head per task.

    Args:
        input_shape: one sample's shape, e.g. (1, 8, 8); flat inputs suit an mlp trunk, images a cnn.
        trunk: "mlp" (Flatten -> [Linear -> ReLU -> Dropout] per hidden width) or "cnn" (SmallCNN's
            conv blocks, then its fully connected layers).
        hidden: trunk widths, at least one; the last is the feature width the heads read.
        heads: task name -> (kind, outputs): "classification" heads emit (N, classes) logits,
            "regression" heads (N, outputs) values.
        channels: conv channels per block (cnn trunk only).
        dropout: after every hidden layer of the trunk and the heads.
        head_hidden: widths of each head's own hidden layers; [] gives linear heads.

    forward(x: (N, *input_shape)) -> {task: (N, outputs)}, in the order of `heads`.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        trunk: str,
        hidden: list[int],
        heads: dict[str, tuple[str, int]],
        channels: list[int] | None = None,
        dropout: float = 0.0,
        head_hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
        if not hidden:
            raise ValueError("the trunk needs at least one hidden width (the feature width)")
        if not heads:
            raise ValueError("a multi-task network needs at least one head")
        for name, (kind, size) in heads.items():
            if not HEAD_NAME.fullmatch(name):
                raise ValueError(f"head name {name!r} must be an identifier (letters, digits, _)")
            if kind not in HEAD_KINDS or size < 1:
                raise ValueError(
                    f"head {name!r}: kind must be one of {HEAD_KINDS} with >= 1 outputs, "
                    f"got ({kind!r}, {size})"
                )
        width = hidden[-1]
        # the body ends in Linear(width); the ReLU makes that layer a feature layer, not an output
        body: nn.Module = (
            MLP(input_shape, hidden[:-1], width, dropout)
            if trunk == "mlp"
            else SmallCNN(input_shape, channels or [32, 64], hidden[:-1], width, dropout)
        )
        self.trunk = nn.Sequential(body, nn.ReLU(), nn.Dropout(dropout))
        self.heads = nn.ModuleDict(
            {
                name: dense_stack(width, list(head_hidden or []), size, dropout)
                for name, (_, size) in heads.items()
            }
        )
        self.head_specs: dict[str, tuple[str, int]] = {
            name: (kind, size) for name, (kind, size) in heads.items()
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)  # (N, width), shared by every head
        return {name: head(features) for name, head in self.heads.items()}


def multitask_spec(
    heads: dict[str, tuple[str, int]],
    trunk: str = "mlp",
    hidden: list[int] | None = None,
    channels: list[int] | None = None,
    dropout: float = 0.0,
    head_hidden: list[int] | None = None,
) -> dict[str, Any]:
    """The JSON-able spec `build_model` takes (and `model.json` stores) for a MultiTaskNet."""
    spec: dict[str, Any] = {
        "kind": "multitask",
        "trunk": trunk,
        "hidden": list(hidden or [64]),
        "dropout": dropout,
        "head_hidden": list(head_hidden or []),
        "heads": {name: [kind, size] for name, (kind, size) in heads.items()},
    }
    if trunk == "cnn":
        spec["channels"] = list(channels or [32, 64])
    return spec


def spec_heads(spec: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """task -> (kind, outputs) of a multitask spec."""
    return {name: (kind, int(size)) for name, (kind, size) in spec["heads"].items()}


def total_outputs(heads: dict[str, tuple[str, int]]) -> int:
    """What `model.json` records as num_outputs for a multitask model: the heads' outputs summed."""
    return sum(size for _, size in heads.values())


def build_multitask(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> MultiTaskNet:
    """The MODELS row: heads come from the spec; num_outputs must be their total."""
    heads = spec_heads(spec)
    if num_outputs != total_outputs(heads):
        raise StillroomError(
            f"a multitask model with heads {', '.join(heads)} has {total_outputs(heads)} outputs "
            f"in all, but {num_outputs} were asked for; check model.json"
        )
    try:
        return MultiTaskNet(
            tuple(input_shape),
            spec.get("trunk", "mlp"),
            list(spec.get("hidden", [64])),
            heads,
            list(spec.get("channels", [32, 64])),
            spec.get("dropout", 0.0),
            list(spec.get("head_hidden", [])),
        )
    except ValueError as err:
        raise StillroomError(f"multitask model: {err}") from None
