"""Losses as pure functions over tensors, and the one table of distillation terms recipes can name."""

from collections.abc import Callable

import torch

from stillroom.losses.logits import (
    IGNORE_INDEX,
    blend,
    hard_label_loss,
    hard_target_loss,
    regression_distillation_loss,
    soft_target_loss,
)

DistillationTerm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(student_outputs, teacher_outputs, temperature) -> scalar loss."""

DISTILLATION_TERMS: dict[str, DistillationTerm] = {
    "soft_target": lambda student, teacher, temperature: soft_target_loss(
        student, teacher, temperature
    ),
    "regression": lambda student, teacher, temperature: regression_distillation_loss(
        student, teacher
    ),
}
"""Every distillation term a recipe's `distill.loss` may name."""

HARD_LABEL_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classification": hard_label_loss,
    "regression": hard_target_loss,
}
"""The supervised term for each task kind."""


def distillation_loss(
    student_outputs: torch.Tensor,
    teacher_outputs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
    class_dim: int = 1,
) -> torch.Tensor:
    """One call for your own training loop: soft targets blended with cross-entropy.

    `alpha * soft_target_loss(s, t, T) + (1 - alpha) * cross_entropy(s, labels)`, with
    `IGNORE_INDEX` labels skipped. Shapes, `mask` and `class_dim` as in `soft_target_loss`;
    labels are the logits' shape without the class dim ((N,) or (N, L)); masked-out positions
    should carry `IGNORE_INDEX` labels.
    """
    kd = soft_target_loss(student_outputs, teacher_outputs, temperature, mask, class_dim)
    if class_dim not in (1, 1 - student_outputs.dim()):
        # cross_entropy wants classes on dim 1: (N, L, V) -> (N, V, L)
        student_outputs = student_outputs.movedim(class_dim, 1)
    ce = hard_label_loss(student_outputs, labels)
    return blend(kd, ce, alpha)


__all__ = [
    "DISTILLATION_TERMS",
    "HARD_LABEL_TERMS",
    "IGNORE_INDEX",
    "blend",
    "distillation_loss",
    "hard_label_loss",
    "hard_target_loss",
    "regression_distillation_loss",
    "soft_target_loss",
]
