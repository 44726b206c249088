"""Standardisation fitted on the training split alone, and saved with every model.

Numeric input features and regression targets are trained on in standardised units; the
statistics travel as a JSON-able `preprocess` dict (in `ArrayData.preprocess`, each model's
model.json and the run's data.json), so a saved or exported student takes inputs and gives
predictions in the user's own units (`stillroom.models.Preprocessed`).

    preprocess = {"input_mean": [...] | None, "input_std": [...] | None,   # one per input feature
                  "target_mean": [...] | None, "target_std": [...] | None} # one per target column
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from stillroom.data.builtin import ArrayData, Splits
from stillroom.data.mapped import MappedInputs, flat_mean_std


def _target_stats(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isnan(targets).any():
        return targets.mean(0), targets.std(0).clamp_min(1e-8)
    # unlabelled rows (NaN) take no part in the statistics
    mean = torch.nanmean(targets, 0)
    count = (~torch.isnan(targets)).sum(0).clamp_min(2)
    var = torch.nansum((targets - mean) ** 2, 0) / (count - 1)
    return mean, var.sqrt().clamp_min(1e-8)


def standardize(splits: Splits, inputs: bool, numeric: list[bool] | None = None) -> Splits:
    """Rescale every split with statistics of `splits.train`: regression targets always, input
    features when `inputs` (those marked True in `numeric`, a flag per flattened input feature;
    None: all). Each split's `preprocess` records what was done."""
    train = splits.train
    preprocess: dict[str, Any] = {
        "input_mean": None,
        "input_std": None,
        "target_mean": None,
        "target_std": None,
    }
    in_mean = in_std = t_mean = t_std = None
    if inputs:
        if isinstance(train.inputs, MappedInputs):
            in_mean, in_std = flat_mean_std(train.inputs)  # a chunk at a time
        else:
            flat = train.inputs.reshape(len(train), -1)
            in_mean, in_std = flat.mean(0), flat.std(0)
        # a constant feature carries nothing to scale; one-hot columns stay 0/1
        in_std = torch.where(in_std > 1e-8, in_std, torch.ones_like(in_std))
        if numeric is not None:
            keep = torch.tensor(numeric, dtype=torch.bool)
            in_mean = torch.where(keep, in_mean, torch.zeros_like(in_mean))
            in_std = torch.where(keep, in_std, torch.ones_like(in_std))
        preprocess["input_mean"], preprocess["input_std"] = in_mean.tolist(), in_std.tolist()
    if train.task == "regression":
        t_mean, t_std = _target_stats(train.targets)
        preprocess["target_mean"] = t_mean.reshape(-1).tolist()
        preprocess["target_std"] = t_std.reshape(-1).tolist()

    if all(value is None for value in preprocess.values()):
        return splits  # nothing rescaled: the data stays as read

    def rescale(data: ArrayData) -> ArrayData:
        x, y = data.inputs, data.targets
        if in_mean is not None and isinstance(x, MappedInputs):
            x = x.rescaled(in_mean, in_std)  # applied as each batch is read
        elif in_mean is not None:
            x = ((x.reshape(len(data), -1) - in_mean) / in_std).reshape(x.shape)
        if t_mean is not None:
            y = (y - t_mean) / t_std
        return replace(data, inputs=x, targets=y, preprocess=preprocess)

    return Splits(rescale(splits.train), rescale(splits.val), rescale(splits.test))


def to_user_units(data: ArrayData) -> ArrayData:
    """`data` as the user gave it: the inverse of `standardize` (for checks in the user's units)."""
    pre = data.preprocess
    if pre is None:
        return data
    x, y = data.inputs, data.targets
    if isinstance(x, MappedInputs):
        x = x.raw()
    elif pre["input_mean"] is not None:
        mean, std = torch.tensor(pre["input_mean"]), torch.tensor(pre["input_std"])
        x = (x.reshape(len(data), -1) * std + mean).reshape(x.shape)
    if pre["target_mean"] is not None:
        mean, std = torch.tensor(pre["target_mean"]), torch.tensor(pre["target_std"])
        y = y * std.reshape(y.shape[1:] or ()) + mean.reshape(y.shape[1:] or ())
    return replace(data, inputs=x, targets=y, preprocess=None)
