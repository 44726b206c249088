"""Decoupled knowledge distillation: the soft-target KL split into its target and non-target parts.

Zhao et al. 2022, "Decoupled Knowledge Distillation" (arXiv:2203.08679). With p the softened class
probabilities and t the true class, the classic KD loss decomposes (their eq. 4) as

    KL(p^T || p^S) = TCKD + (1 - p^T_t) * NCKD

    TCKD = KL(b^T || b^S),  b = (p_t, 1 - p_t): target versus all non-target classes;
    NCKD = KL(p_hat^T || p_hat^S),  p_hat_k = p_k / (1 - p_t) for k != t: the non-target classes,
    renormalised among themselves.

The teacher's confidence (1 - p^T_t) suppresses NCKD exactly on the samples the teacher knows well;
DKD weights the two parts freely instead: alpha * TCKD + beta * NCKD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stillroom.losses.kl import kl_divergence
from stillroom.losses.logits import IGNORE_INDEX


def _binary_log_probs(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(log p_t, log(1 - p_t)) per row: (M, C) log-probabilities, (M, C) bool target mask -> (M, 2)."""
    log_p_target = log_p.masked_fill(~target, float("-inf")).logsumexp(dim=1)
    # log(1 - p_t) as the logsumexp of the non-target log-probs: 1 - exp(log p_t) would round to
    # 0 (and its log to -inf) for a confident model
    log_p_other = log_p.masked_fill(target, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_p_target, log_p_other], dim=1)


def decoupled_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """DKD: (alpha * TCKD + beta * NCKD) * T**2, averaged over the labelled samples.

    Zhao et al. 2022 (arXiv:2203.08679), eq. 5. The defaults are the paper's CIFAR-100 setting
    (alpha 1, beta 8, T 4; beta is tuned per teacher-student pair); on ImageNet it uses alpha 1,
    beta 0.5, T 1. The authors add the DKD loss to the cross-entropy (weight 1), ramping the DKD
    weight linearly from 0 over the first epochs (20 on CIFAR-100), rather than blending the two.

    Args:
        student_logits: (N, C), C >= 2.
        teacher_logits: (N, C).
        labels: (N,) int64 true classes. DKD needs the true class to split target from non-target,
            so a sample labelled `IGNORE_INDEX` contributes nothing, to the loss or its gradient;
            the mean is over the labelled samples, so its scale does not depend on how many are
            labelled. A batch without a labelled sample gives 0.
        alpha: weight of TCKD, >= 0.
        beta: weight of NCKD, >= 0.
        temperature: T > 0; both distributions are softmax(logits / T).

    Returns:
        scalar fp32. alpha = beta = 1 is not the classic KD loss, which weights NCKD by the
        per-sample (1 - p^T_t): KL = TCKD + (1 - p^T_t) * NCKD.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"DKD compares classification logits (N, C) of equal shape, got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    n, num_classes = student_logits.shape
    if num_classes < 2:
        raise ValueError(
            f"DKD needs at least 2 classes (a target and a non-target), got {num_classes}"
        )
    if labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer class ids of shape ({n},), got {labels.dtype} of shape "
            f"{tuple(labels.shape)}"
        )
    if not temperature > 0:  # also rejects nan
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(
            f"alpha and beta weight the two parts and must be >= 0, got {alpha}, {beta}"
        )

    labelled = labels != IGNORE_INDEX
    bad = labelled & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {num_classes}) or IGNORE_INDEX ({IGNORE_INDEX}), got "
            f"{labels[bad].unique().tolist()}"
        )
    if not labelled.any():
        # keeps a graph to the student, so a step on an unlabelled batch backpropagates zeros
        return student_logits.sum() * 0.0

    # only labelled rows go in: an unlabelled sample has no target to split off
    target = F.one_hot(labels[labelled], num_classes).bool()  # (M, C)
    # fp32 for the softmaxes: half precision loses the small probabilities the soft targets carry
    student_scaled = student_logits[labelled].float() / temperature
    teacher_scaled = teacher_logits[labelled].float() / temperature

    log_p_student = F.log_softmax(student_scaled, dim=1)
    log_p_teacher = F.log_softmax(teacher_scaled, dim=1)
    tckd = kl_divergence(
        _binary_log_probs(log_p_teacher, target), _binary_log_probs(log_p_student, target)
    )

    # softmax over the non-target logits alone is p_k / (1 - p_t): the target logit becomes -inf
    # (exactly 0 probability; the authors' code subtracts 1000 instead)
    log_p_hat_student = F.log_softmax(student_scaled.masked_fill(target, float("-inf")), dim=1)
    log_p_hat_teacher = F.log_softmax(teacher_scaled.masked_fill(target, float("-inf")), dim=1)
    nckd = kl_divergence(log_p_hat_teacher, log_p_hat_student)

    return (alpha * tckd + beta * nckd).mean() * temperature**2
