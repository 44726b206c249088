"""Task metrics on a loader: accuracy for classification, RMSE for regression."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from stillroom.losses import IGNORE_INDEX

METRICS = {"classification": ("accuracy", "max"), "regression": ("rmse", "min")}
"""task -> (the metric that picks the best checkpoint, whether higher or lower is better)."""


def is_better(task: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if METRICS[task][1] == "max" else value < best


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, accelerator: Accelerator | None = None):
    """(outputs, targets) over the whole loader, gathered across processes when distributed."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for batch in loader:
        inputs, target = batch[0], batch[1]
        if accelerator is None:
            inputs = inputs.to(next(model.parameters()).device)
        out = model(inputs).float()
        if accelerator is not None:
            out, target = accelerator.gather_for_metrics((out, target))
        outputs.append(out.cpu())
        targets.append(target.cpu())
    model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)


def evaluate(
    model: nn.Module, loader: DataLoader, task: str, accelerator: Accelerator | None = None
) -> dict[str, float]:
    """{"accuracy", "loss"} (cross-entropy) or {"rmse", "loss"} (MSE) over labelled samples."""
    outputs, targets = predict(model, loader, accelerator)
    if task == "classification":
        keep = targets != IGNORE_INDEX
        outputs, targets = outputs[keep], targets[keep]
        return {
            "accuracy": (outputs.argmax(1) == targets).float().mean().item(),
            "loss": F.cross_entropy(outputs, targets).item(),
        }
    outputs = outputs.view(targets.shape)
    labelled = ~torch.isnan(targets)  # NaN marks a sample without a target
    mse = F.mse_loss(outputs[labelled], targets[labelled]).item()
    return {"rmse": math.sqrt(mse), "loss": mse}
