"""Losses over dense maps (N, C, H, W): segmentation logits, CenterNet-style detection heads.

A detection head here is one tensor (N, C + 2, H, W): C class-heatmap logits (sigmoid: the
probability that an object of class c is centred on that cell) and 2 box-size channels (width,
height in output cells) read at object centres (Zhou et al. 2019, "Objects as Points"). Boxes
are given as (N, M, 5) rows `(class, x0, y0, x1, y1)` in fractions of the image width and height
(so one box tensor serves heads of any output stride), padded with rows of class -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stillroom.losses.features import align_spatial
from stillroom.losses.logits import IGNORE_INDEX

SIZE_CHANNELS = 2
"""Box width and height: the last two channels of a detection head."""
SIZE_WEIGHT = 0.1
"""CenterNet's weight of the size loss beside the heatmap focal loss."""


def align_to(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student map (N, C, H_s, W_s) at the teacher's spatial size (H_t, W_t): pooled when
    larger, bilinear when smaller (stillroom.losses.align_spatial); unchanged when equal."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    return align_spatial(student, tuple(teacher.shape[-2:]))


def channel_wise_loss(
    student_maps: torch.Tensor, teacher_maps: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Channel-wise distillation, Shu et al. 2021 (arXiv:2011.13256), eq. 2-3.

    Each channel's map is turned into a distribution over its H*W positions (softmax of
    logits / T), and the student's is pulled to the teacher's by KL(teacher || student), which
    attends to where each channel is most active rather than matching every pixel alike.

    Args:
        student_maps, teacher_maps: (N, C, H, W), the same shape (align first; see `align_to`).
        temperature: T > 0.

    Returns:
        scalar: the KL summed over positions, averaged over N * C channel maps, times T**2.
    """
    if student_maps.shape != teacher_maps.shape or student_maps.dim() != 4:
        raise ValueError(
            f"channel-wise distillation compares two (N, C, H, W) maps of one shape; got "
            f"{tuple(student_maps.shape)} and {tuple(teacher_maps.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_maps.float().flatten(2) / temperature, dim=2)
    t = F.log_softmax(teacher_maps.float().flatten(2) / temperature, dim=2)
    kl = (t.exp() * (t - s)).sum(2)  # (N, C)
    return kl.mean() * temperature**2


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy of (N, C, H', W') logits to (N, H, W) class masks, IGNORE_INDEX
    pixels skipped; logits at another resolution are resized (bilinear) to the masks' first."""
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    if not (masks != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # a batch without a labelled pixel teaches nothing
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)


def render_heatmaps(
    boxes: torch.Tensor, num_classes: int, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterNet training targets at output size (H, W) from (N, M, 5) boxes in image fractions.

    Returns:
        heat: (N, C, H, W) Gaussian peaks (1 at each object's centre cell, sigma = box side / 6
            in cells), the max over objects of one class;
        sizes: (N, M, 2) box width and height in output cells;
        centres: (N, M) flat index y * W + x of each box's centre cell, -1 for padding rows.
    """
    n, m, _ = boxes.shape
    h, w = size
    valid = boxes[..., 0] >= 0
    cls = boxes[..., 0].long().clamp(min=0)
    x0, x1 = boxes[..., 1] * w, boxes[..., 3] * w
    y0, y1 = boxes[..., 2] * h, boxes[..., 4] * h
    cx = ((x0 + x1) / 2).floor().clamp(0, w - 1)
    cy = ((y0 + y1) / 2).floor().clamp(0, h - 1)
    sizes = torch.stack([x1 - x0, y1 - y0], dim=-1)
    sx = (sizes[..., 0] / 6).clamp(min=0.5)
    sy = (sizes[..., 1] / 6).clamp(min=0.5)
    xs = torch.arange(w, dtype=boxes.dtype, device=boxes.device)
    ys = torch.arange(h, dtype=boxes.dtype, device=boxes.device)
    gx = torch.exp(-((xs.view(1, 1, w) - cx[..., None]) ** 2) / (2 * sx[..., None] ** 2))
    gy = torch.exp(-((ys.view(1, 1, h) - cy[..., None]) ** 2) / (2 * sy[..., None] ** 2))
    peaks = gy[..., :, None] * gx[..., None, :] * valid[..., None, None]  # (N, M, H, W)
    onehot = F.one_hot(cls, num_classes).to(boxes.dtype) * valid[..., None]  # (N, M, C)
    heat = (
        (peaks[:, :, None] * onehot[..., None, None]).amax(1)
        if m
        else boxes.new_zeros(n, num_classes, h, w)
    )
    centres = torch.where(valid, (cy * w + cx).long(), -1)
    return heat, sizes, centres


def _at_centres(maps: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) maps read at (N, M) flat centre indices -> (N, M, K) (padding: index 0)."""
    flat = maps.flatten(2)  # (N, K, H*W)
    index = centres.clamp(min=0)[:, None, :].expand(-1, flat.shape[1], -1)
    return flat.gather(2, index).transpose(1, 2)


def centernet_loss(outputs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The supervised CenterNet objective (Zhou et al. 2019): penalty-reduced focal loss on the
    class heatmaps (alpha 2, beta 4, normalised by the number of objects) + 0.1 * L1 of the box
    sizes at object centres.

    Args:
        outputs: (N, C + 2, H, W) head: heatmap logits, then width and height in cells.
        boxes: (N, M, 5) `(class, x0, y0, x1, y1)` in image fractions, class -1 for padding.
    """
    num_classes = outputs.shape[1] - SIZE_CHANNELS
    logits, size_maps = outputs[:, :num_classes].float(), outputs[:, num_classes:].float()
    heat, sizes, centres = render_heatmaps(boxes.float(), num_classes, tuple(outputs.shape[-2:]))
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    peak = heat >= 1.0 - 1e-6
    pos = torch.log(p) * (1 - p) ** 2
    neg = torch.log(1 - p) * p**2 * (1 - heat) ** 4
    valid = centres >= 0
    objects = valid.sum().clamp(min=1)
    focal = -(torch.where(peak, pos, neg)).sum() / objects
    predicted = _at_centres(size_maps, centres)  # (N, M, 2)
    size = ((predicted - sizes).abs().sum(-1) * valid).sum() / objects
    return focal + SIZE_WEIGHT * size


def heatmap_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-cell, per-class binary cross-entropy of the student's heatmap to the teacher's
    softened probabilities sigmoid(teacher / T): the soft-target term of a sigmoid head, each
    cell a Bernoulli (Hinton et al. 2015 applied per class, as CenterNet distillation does).

    Args:
        student_logits, teacher_logits: (N, C, H, W) heatmap logits of one shape.
        temperature: T > 0, applied to both sides; the loss is scaled by T**2.

    Returns:
        scalar: BCE averaged over every cell and class, minus the teacher's own entropy (so it
        is 0 exactly when the two agree), times T**2.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"heatmaps {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} differ"
        )
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = torch.sigmoid(t)
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(t, target, reduction="none")
    return (bce - entropy).mean() * temperature**2


def box_distillation_loss(
    student_sizes: torch.Tensor, teacher_sizes: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """L1 between the student's and the teacher's box-size maps, each cell weighted by the
    teacher's confidence that an object is centred there (its max class probability), so the
    student copies the teacher's boxes where the teacher sees objects, not on the background.

    Args:
        student_sizes, teacher_sizes: (N, 2, H, W) width and height maps.
        teacher_logits: (N, C, H, W) the teacher's heatmap logits.

    Returns:
        scalar: sum_cells w * |s - t|_1 / sum_cells w.
    """
    if student_sizes.shape != teacher_sizes.shape:
        raise ValueError(
            f"size maps {tuple(student_sizes.shape)} and {tuple(teacher_sizes.shape)} differ"
        )
    weight = torch.sigmoid(teacher_logits.float()).amax(1)  # (N, H, W)
    l1 = (student_sizes.float() - teacher_sizes.float()).abs().sum(1)
    return (weight * l1).sum() / weight.sum().clamp(min=1e-6)
