"""A model wrapped with the standardisation its data had, so it works in the user's units.

Students train on standardised numeric features and (regression) standardised targets; the
statistics are saved in model.json as `preprocess` (see `stillroom.data.scaling`). Wrapped, the
model takes inputs as the user's data holds them and predicts in the target's own units, which is
what `stillroom export` writes and `load_model(..., user_units=True)` returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Preprocessed(nn.Module):
    """forward(x in user units) = model((x - input_mean) / input_std) * target_std + target_mean."""

    def __init__(self, model: nn.Module, preprocess: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        for name in ("input_mean", "input_std", "target_mean", "target_std"):
            value = preprocess.get(name)
            tensor = torch.tensor(value, dtype=torch.float32) if value is not None else None
            # not persistent: the numbers live in model.json, the weights file holds the model's
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mean is not None:
            shape = x.shape
            x = ((x.reshape(shape[0], -1) - self.input_mean) / self.input_std).reshape(shape)
        out = self.model(x)
        if self.target_mean is not None:
            out = out * self.target_std + self.target_mean
        return out


def build_preprocessed(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """MODELS row: {"kind": "preprocessed", "model": <inner spec>, "preprocess": {...}}."""
    from stillroom.models import build_model

    return Preprocessed(build_model(spec["model"], input_shape, num_outputs), spec["preprocess"])


class Standardized(nn.Module):
    """The inverse view, for a frozen teacher from another framework that works in the user's
    units: forward(x standardised) = (model(x * input_std + input_mean) - target_mean) / target_std,
    so it sits in the pipeline beside students trained on standardised data."""

    def __init__(self, model: nn.Module, preprocess: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.scale = Preprocessed(nn.Identity(), preprocess)  # holds the same statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if scale.input_mean is not None:
            shape = x.shape
            x = (x.reshape(shape[0], -1) * scale.input_std + scale.input_mean).reshape(shape)
        out = self.model(x)
        if scale.target_mean is not None:
            out = (out - scale.target_mean) / scale.target_std
        return out
