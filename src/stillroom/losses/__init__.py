"""Losses as pure functions over tensors. The table of term kinds a recipe can name is
`stillroom.objective.TERMS`."""

from collections.abc import Callable

import torch

from stillroom.losses.dense import centernet_loss, segmentation_loss
from stillroom.losses.dkd import decoupled_kd_loss
from stillroom.losses.features import (
    Projector,
    align_spatial,
    attention_map_kl,
    attention_transfer_loss,
    hidden_state_loss,
    hint_loss,
    make_projector,
    uniform_layer_map,
)
from stillroom.losses.logits import (
    IGNORE_INDEX,
    blend,
    hard_label_loss,
    hard_target_loss,
    regression_distillation_loss,
    soft_target_loss,
)
from stillroom.losses.relations import rkd_angle_loss, rkd_distance_loss
from stillroom.losses.sequence import (
    token_distillation_loss,
    token_divergence,
    topk_token_divergence,
)
from stillroom.losses.topk import TopKTargets, topk_soft_target_loss, topk_targets_from_logits


def token_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, L, V) token logits to (N, L) labels (next tokens for a causal LM,
    masked tokens for an MLM), `IGNORE_INDEX` positions skipped."""
    return hard_label_loss(logits.movedim(-1, 1), labels)


HARD_LABEL_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classification": hard_label_loss,
    "regression": hard_target_loss,
    "language_modeling": token_label_loss,
    # sentence embeddings: the targets are reference vectors (N, D), fitted by MSE
    "embedding": hard_target_loss,
    # dense heads: per-pixel cross-entropy to masks; CenterNet focal + size loss to boxes
    "segmentation": segmentation_loss,
    "detection": centernet_loss,
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
    "HARD_LABEL_TERMS",
    "IGNORE_INDEX",
    "Projector",
    "TopKTargets",
    "align_spatial",
    "attention_map_kl",
    "attention_transfer_loss",
    "blend",
    "decoupled_kd_loss",
    "distillation_loss",
    "hard_label_loss",
    "hard_target_loss",
    "hidden_state_loss",
    "hint_loss",
    "make_projector",
    "regression_distillation_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "soft_target_loss",
    "token_distillation_loss",
    "token_divergence",
    "topk_soft_target_loss",
    "topk_targets_from_logits",
    "topk_token_divergence",
    "uniform_layer_map",
]
