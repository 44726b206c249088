"""Losses over model outputs: soft targets, regression distillation, hard labels, and the blend.

Every function is pure: tensors in, a scalar tensor out. Shapes follow PyTorch's `cross_entropy`
convention, classes on dim 1: (N, C) for classification, (N, C, H, W) for dense prediction. Sequence
outputs from language models are (N, L, V) with classes last: pass `class_dim=-1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stillroom.losses.kl import kl_divergence

IGNORE_INDEX = -100
"""Label value for samples without a label (the few-label setting); they get no hard-label loss."""


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `per_position` over the positions where `mask` is True (all when mask is None)."""
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the loss has one value per position of shape "
            f"{tuple(per_position.shape)}: the mask must match the outputs without their class dim"
        )
    mask = mask.bool()
    # where, not multiply: a non-finite value at a masked position must not leak in as 0 * inf
    kept = torch.where(mask, per_position, torch.zeros_like(per_position))
    # clamp: a batch with no valid position gives 0, not nan, and still keeps the graph intact
    return kept.sum() / mask.sum().clamp_min(1).to(per_position.dtype)


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    class_dim: int = 1,
) -> torch.Tensor:
    """KL(teacher_T || student_T) * T**2, the soft-target term of Hinton et al. 2015 (arXiv:1503.02531).

    Args:
        student_logits: (N, C), (N, C, H, W) or, with `class_dim=-1`, (N, L, V).
        teacher_logits: same shape as `student_logits`.
        temperature: T > 0; both distributions are softmax(logits / T).
        mask: bool, the shape of the logits without the class dim, e.g. (N, L); False positions
            contribute nothing (padding, prompt tokens, ignored pixels).
        class_dim: the dim that holds the classes.

    Returns:
        scalar: the KL summed over classes, averaged over (valid) positions. For (N, C) this is
        PyTorch's `reduction="batchmean"`; it is never a mean over class elements, which would shrink
        the loss by 1/C. The T**2 factor keeps gradient magnitudes comparable across temperatures,
        since the gradients of the softened KL scale as 1/T**2.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student outputs {tuple(student_logits.shape)} and teacher outputs "
            f"{tuple(teacher_logits.shape)} differ in shape: the student needs the teacher's "
            "number of classes (check num_classes / the output head)"
        )
    if not temperature > 0:  # also rejects nan
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # fp32 for the softmaxes: half precision loses the small probabilities the soft targets carry
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=class_dim)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=class_dim)
    # a class the teacher rules out (a -inf logit, e.g. a masked vocabulary entry) adds 0
    kl_per_position = kl_divergence(log_p_teacher, log_p_student, dim=class_dim)
    return _masked_mean(kl_per_position, mask) * temperature**2


def regression_distillation_loss(
    student_outputs: torch.Tensor,
    teacher_outputs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error to the teacher's outputs, for teachers that do not emit class logits.

    Args:
        student_outputs, teacher_outputs: any identical shape, e.g. (N,) or (N, D).
        mask: bool, same shape; False entries contribute nothing.
    """
    if student_outputs.shape != teacher_outputs.shape:
        raise ValueError(
            f"student outputs {tuple(student_outputs.shape)} and teacher outputs "
            f"{tuple(teacher_outputs.shape)} differ in shape: the student's output head must match"
        )
    squared = (student_outputs.float() - teacher_outputs.float()) ** 2
    return _masked_mean(squared, mask)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the true labels, averaged over the labelled samples only.

    Args:
        logits: (N, C) (or (N, C, H, W) with labels (N, H, W)).
        labels: int64 class ids; `IGNORE_INDEX` marks a sample without a label. A batch with no
            labelled sample gives 0.
    """
    # the sum over labelled samples divided by their count (at least 1): the mean that
    # cross_entropy would give, and 0 for a batch without labels, with no host sync to ask which
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def hard_target_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the true regression targets; NaN targets mark missing labels."""
    if outputs.shape != targets.shape:
        raise ValueError(
            f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    labelled = ~torch.isnan(targets)
    return regression_distillation_loss(outputs, torch.nan_to_num(targets), labelled)


def blend(distillation: torch.Tensor, hard_label: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * distillation + (1 - alpha) * hard_label`.

    alpha weights the *distillation* term (alpha=0 is training on labels alone, alpha=1 is pure
    imitation). Some toolkits use the opposite convention; stillroom always means this one.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * distillation + (1.0 - alpha) * hard_label
