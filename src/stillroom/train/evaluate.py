"""Task metrics on a loader: accuracy (classification), RMSE (regression), perplexity (language
modelling), cosine to reference vectors (embeddings), mIoU and pixel accuracy (segmentation),
mAP@0.5 (detection); per named output for dict-output models.

Metrics are accumulated batch by batch from per-sample sums, so a language model's (N, L, V) logits
are never gathered for the whole validation set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from stillroom.dense.metrics import (
    decode_detections,
    detection_map,
    segmentation_metrics,
    segmentation_sums,
)
from stillroom.losses import IGNORE_INDEX
from stillroom.losses.dense import SIZE_CHANNELS
from stillroom.objective import match_targets, to_device

METRICS = {
    "classification": ("accuracy", "max"),
    "regression": ("rmse", "min"),
    "language_modeling": ("perplexity", "min"),
    "embedding": ("cosine", "max"),
    "segmentation": ("miou", "max"),
    "detection": ("map50", "max"),
}
"""task -> (the metric that picks the best checkpoint, whether higher or lower is better)."""


def is_better(task: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if METRICS[task][1] == "max" else value < best


def _device_of(model: nn.Module) -> torch.device:
    from stillroom.models import device_of

    return device_of(model)


def _concat(chunks: list[Any]) -> Any:
    if isinstance(chunks[0], dict):
        return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
    return torch.cat(chunks)


def _float_cpu(out: Any) -> Any:
    if isinstance(out, dict):
        return {key: value.float().cpu() for key, value in out.items()}
    return out.float().cpu()


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, accelerator: Accelerator | None = None):
    """(outputs, targets) over the whole loader, gathered across processes when distributed.
    Outputs (and targets) are dicts of tensors for models with named outputs."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for batch in loader:
        inputs, target = batch[0], batch[1]
        if accelerator is None:
            inputs = to_device(inputs, _device_of(model))
        out = model(inputs)
        if accelerator is not None:
            out, target = accelerator.gather_for_metrics((out, target))
        outputs.append(_float_cpu(out))
        targets.append(_float_cpu(target) if isinstance(target, dict) else target.cpu())
    model.train(was_training)
    return _concat(outputs), _concat(targets)


def _sample_sums(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample sums (N, 3) the task's metrics are made of: summed over samples, then divided."""
    outputs = outputs.float()
    if task == "classification":
        labelled = targets != IGNORE_INDEX
        safe = torch.where(labelled, targets, 0)
        nll = F.cross_entropy(outputs, safe, reduction="none")
        correct = (outputs.argmax(1) == targets).float()
        w = labelled.float()
        sums = torch.stack([correct * w, nll * w, w], dim=1)
        # (N, C, H, W) logits against (N, H, W) labels: every labelled pixel counts
        return sums.flatten(2).sum(2) if sums.dim() > 2 else sums
    if task == "regression":
        outputs = match_targets(outputs, targets)
        labelled = ~torch.isnan(targets)
        squared = torch.where(labelled, (outputs - torch.nan_to_num(targets)) ** 2, 0.0)
        dims = tuple(range(1, squared.dim()))
        count = labelled.float().sum(dims) if dims else labelled.float()
        total = squared.sum(dims) if dims else squared
        return torch.stack([total, total, count], dim=1)
    if task == "language_modeling":
        # (N, L, V) logits against (N, L) labels; per sequence: summed NLL, correct, tokens
        labelled = targets != IGNORE_INDEX
        safe = torch.where(labelled, targets, 0)
        nll = F.cross_entropy(outputs.movedim(-1, 1), safe, reduction="none")
        w = labelled.float()
        correct = (outputs.argmax(-1) == targets).float() * w
        return torch.stack([(nll * w).sum(1), correct.sum(1), w.sum(1)], dim=1)
    if task == "segmentation":
        return segmentation_sums(outputs, targets)
    assert task == "embedding"
    cosine = F.cosine_similarity(outputs, targets.float(), dim=1)
    squared = ((outputs - targets.float()) ** 2).mean(1)
    return torch.stack([cosine, squared, torch.ones_like(cosine)], dim=1)


def _metrics(task: str, sums: torch.Tensor) -> dict[str, float]:
    if task == "segmentation":
        return segmentation_metrics(sums)
    a, b, count = (float(v) for v in sums)
    count = max(count, 1.0)
    if task == "classification":
        return {"accuracy": a / count, "loss": b / count}
    if task == "regression":
        return {"rmse": math.sqrt(a / count), "loss": a / count}
    if task == "language_modeling":
        return {
            "perplexity": math.exp(min(a / count, 50.0)),
            "token_accuracy": b / count,
            "loss": a / count,
        }
    return {"cosine": a / count, "loss": b / count}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: str | dict[str, str],
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Metrics over the labelled samples: {"accuracy", "loss"} (classification), {"rmse", "loss"}
    (regression), {"perplexity", "token_accuracy", "loss"} (language modelling), {"cosine", "loss"}
    (embeddings), {"miou", "pixel_accuracy"} (segmentation), {"map50", "map"} (detection: the
    whole split's decoded detections scored at once). For a model with named outputs, `task` maps each output to its task and the keys
    are "<output>/<metric>"."""
    was_training = model.training
    model.eval()
    tasks = task if isinstance(task, dict) else {None: task}
    # per-sample sums are 3 numbers, or 3C + 2 for segmentation: sized by the first batch
    totals: dict[str | None, torch.Tensor | None] = dict.fromkeys(tasks)
    # detection is scored over the whole split: its decoded detections and boxes are kept
    found: dict[str | None, list[tuple[torch.Tensor, torch.Tensor]]] = {key: [] for key in tasks}
    classes: dict[str | None, int] = {}
    for batch in loader:
        inputs, target = batch[0], batch[1]
        if accelerator is None:
            inputs = to_device(inputs, _device_of(model))
        out = model(inputs)
        for key, kind in tasks.items():
            o = out if key is None else out[key]
            # one label tensor serves every named output (the exits of a self-distilled network)
            t = target[key] if isinstance(target, dict) else target
            if kind == "detection":
                pair = (decode_detections(o), t.to(o.device))
                if accelerator is not None:
                    pair = accelerator.gather_for_metrics(pair)
                found[key].append((pair[0].cpu(), pair[1].float().cpu()))
                classes[key] = o.shape[1] - SIZE_CHANNELS
                continue
            sums = _sample_sums(kind, o, t.to(o.device))
            if accelerator is not None:
                sums = accelerator.gather_for_metrics(sums)
            batch_sum = sums.sum(0).cpu()
            totals[key] = batch_sum if totals[key] is None else totals[key] + batch_sum
    model.train(was_training)
    results: dict[str, float] = {}
    for key, kind in tasks.items():
        prefix = "" if key is None else f"{key}/"
        if kind == "detection":
            scores = _detection_scores(found[key], classes.get(key, 1))
        else:
            scores = _metrics(kind, totals[key] if totals[key] is not None else torch.zeros(3))
        results.update({prefix + name: v for name, v in scores.items()})
    return results


def _detection_scores(
    found: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> dict[str, float]:
    if not found:
        return {"map50": 0.0, "map": 0.0}
    detections = torch.cat([d for d, _ in found])
    boxes = torch.cat([b for _, b in found])
    return detection_map(detections, boxes, num_classes)
