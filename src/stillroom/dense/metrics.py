"""Dense metrics: mIoU and pixel accuracy (segmentation), CenterNet decoding and mAP@0.5 by
pycocotools' COCOeval (detection)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.losses.dense import SIZE_CHANNELS

MAX_DETECTIONS = 20
"""Detections kept per image (the top-scoring heatmap peaks)."""
COCO_SCALE = 100.0
"""Boxes are image fractions; COCO's evaluator gets them in a 100 x 100 frame (IoU does not
depend on the scale)."""


def segmentation_sums(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image counts (N, 3C + 2) the segmentation metrics are made of: intersection per
    class (C), predicted pixels per class (C), true pixels per class (C), correct pixels,
    labelled pixels; IGNORE_INDEX pixels left out. Logits at another resolution are resized to
    the masks' (bilinear) first."""
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    classes = logits.shape[1]
    labelled = masks != IGNORE_INDEX
    predicted = logits.argmax(1)
    if (masks[labelled] >= classes).any() or (masks[labelled] < 0).any():
        raise StillroomError(
            f"the masks hold class {int(masks[labelled].max())} but the model predicts "
            f"{classes} classes; give the head one output per class"
        )
    pred_hot = F.one_hot(predicted, classes) * labelled[..., None]
    true_hot = F.one_hot(torch.where(labelled, masks, 0), classes) * labelled[..., None]
    inter = (pred_hot * true_hot).flatten(1, 2).sum(1)
    pred = pred_hot.flatten(1, 2).sum(1)
    true = true_hot.flatten(1, 2).sum(1)
    correct = ((predicted == masks) & labelled).flatten(1).sum(1, keepdim=True)
    count = labelled.flatten(1).sum(1, keepdim=True)
    return torch.cat([inter, pred, true, correct, count], dim=1).double()


def segmentation_metrics(sums: torch.Tensor) -> dict[str, float]:
    """mIoU over the classes present in the labels or the predictions (IoU = I / (P + T - I)),
    and pixel accuracy, from summed `segmentation_sums`."""
    classes = (sums.numel() - 2) // 3
    inter, pred, true = sums[:classes], sums[classes : 2 * classes], sums[2 * classes : -2]
    union = pred + true - inter
    seen = union > 0
    miou = float((inter[seen] / union[seen]).mean()) if seen.any() else 0.0
    return {"miou": miou, "pixel_accuracy": float(sums[-2] / sums[-1].clamp(min=1))}


def decode_detections(outputs: torch.Tensor, k: int = MAX_DETECTIONS) -> torch.Tensor:
    """CenterNet decoding of a (N, C + 2, H, W) head into (N, k, 6) rows
    (x0, y0, x1, y1, score, class) in image fractions: the top-k local maxima (3x3) of the
    class heatmaps, each with the width and height read at its cell."""
    num_classes = outputs.shape[1] - SIZE_CHANNELS
    h, w = outputs.shape[-2:]
    heat = torch.sigmoid(outputs[:, :num_classes].float())
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)  # the 3x3 NMS
    k = min(k, num_classes * h * w)
    scores, index = peaks.flatten(1).topk(k, dim=1)
    cls, cell = index // (h * w), index % (h * w)
    cy, cx = (cell // w).float() + 0.5, (cell % w).float() + 0.5
    sizes = outputs[:, num_classes:].float().flatten(2)  # (N, 2, H*W)
    bw = sizes[:, 0].gather(1, cell).clamp(min=0)
    bh = sizes[:, 1].gather(1, cell).clamp(min=0)
    box = torch.stack([(cx - bw / 2) / w, (cy - bh / 2) / h, (cx + bw / 2) / w, (cy + bh / 2) / h])
    return torch.cat([box.permute(1, 2, 0).clamp(0, 1), scores[..., None], cls[..., None]], dim=2)


def detection_map(detections: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> dict:
    """mAP@0.5 and mAP@[.5:.95] by pycocotools' COCOeval over every image.

    detections: (N, K, 6) from `decode_detections`; boxes: (N, M, 5) ground truth
    (class, x0, y0, x1, y1) in image fractions, class -1 for padding."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise StillroomError(
            "detection mAP needs pycocotools; pip install 'stillroom[dense]'"
        ) from None
    images, annotations = [], []
    for i, rows in enumerate(boxes.double().numpy()):
        images.append({"id": i, "width": COCO_SCALE, "height": COCO_SCALE})
        for c, x0, y0, x1, y1 in rows[rows[:, 0] >= 0]:
            bw, bh = (x1 - x0) * COCO_SCALE, (y1 - y0) * COCO_SCALE
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1,
                "bbox": [x0 * COCO_SCALE, y0 * COCO_SCALE, bw, bh], "area": bw * bh,
                "iscrowd": 0,
            })  # fmt: skip
    if not annotations:
        return {"map50": 0.0, "map": 0.0}
    dets = detections.double().numpy()
    rows = []
    for i, image in enumerate(dets):
        for x0, y0, x1, y1, score, c in image:
            if x1 > x0 and y1 > y0:
                rows.append([i, x0 * COCO_SCALE, y0 * COCO_SCALE, (x1 - x0) * COCO_SCALE,
                             (y1 - y0) * COCO_SCALE, score, c + 1])  # fmt: skip
    if not rows:
        return {"map50": 0.0, "map": 0.0}
    # COCO prints its progress and tables to stdout: a run's output stays the run's own
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1} for c in range(num_classes)],
        }
        truth.createIndex()
        found = truth.loadRes(np.array(rows))
        evaluator = COCOeval(truth, found, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map50": max(float(stats[1]), 0.0), "map": max(float(stats[0]), 0.0)}
