"""Soft-target loss from a teacher's top-k log-probabilities plus the mass left outside them.

Storing a language model's full distribution costs V values per token (V = 49,152 for SmolLM2);
keeping the k most likely classes and the probability mass outside them costs k + 1. The loss then
compares teacher and student on k + 1 buckets: the teacher's top-k classes, and one "rest" bucket
holding everything else. This is the coarsened KL of the full distributions, a lower bound on it
(data-processing inequality) that becomes exact when k = V.

References: Hinton et al. 2015 (arXiv:1503.02531) for the soft-target KL with temperature. Caching
only the top-k teacher logits is common practice in LLM distillation; Anshumann et al. 2025 ("Sparse
Logit Sampling: Accelerating Knowledge Distillation in LLMs") show that renormalising over the top k
alone biases the student; the rest bucket here keeps the teacher's mass outside the top k in the
target, so the student is not pushed to put all its mass on k classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stillroom.losses.kl import kl_divergence
from stillroom.losses.logits import _masked_mean


@dataclass(frozen=True)
class TopKTargets:
    """A teacher's k most likely classes per position, at temperature 1.

    Shapes follow the teacher's outputs with the class dim of size V replaced by k (the same
    `class_dim` the loss is given): for logits (N, L, V) with class_dim=-1, `logprobs` and `indices`
    are (N, L, k) and `tail_mass` is (N, L).

    logprobs: float, log p_i = log_softmax(teacher_logits)_i of the k classes (T = 1).
    indices: int64 class ids of those k classes (any order; distinct per position).
    tail_mass: float, 1 - sum of the teacher's probabilities on the k classes (>= 0).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail_mass: torch.Tensor

    def to(self, device: torch.device | str) -> TopKTargets:
        return TopKTargets(
            self.logprobs.to(device), self.indices.to(device), self.tail_mass.to(device)
        )


def topk_targets_from_logits(
    teacher_logits: torch.Tensor, k: int, class_dim: int = -1
) -> TopKTargets:
    """The k most likely classes of `teacher_logits` (..., V, ...) along `class_dim`, at T = 1.

    The tail mass is computed as exp(logsumexp(rest) - logsumexp(all)), not as 1 - sum(top-k):
    the subtraction would cancel catastrophically when the tail is tiny.
    """
    num_classes = teacher_logits.shape[class_dim]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}] (the number of classes), got {k}")
    logits = teacher_logits.detach().float()
    log_z = torch.logsumexp(logits, dim=class_dim, keepdim=True)
    top_logits, indices = torch.topk(logits, k, dim=class_dim)
    rest = logits.scatter(class_dim, indices, float("-inf"))
    tail = (torch.logsumexp(rest, dim=class_dim, keepdim=True) - log_z).exp()
    return TopKTargets(top_logits - log_z, indices, tail.squeeze(class_dim))


def topk_soft_target_loss(
    student_logits: torch.Tensor,
    targets: TopKTargets,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    class_dim: int = -1,
) -> torch.Tensor:
    """KL(teacher_T || student_T) * T**2 over the teacher's top-k classes plus one "rest" bucket.

    Args:
        student_logits: (N, V), (N, L, V) or (N, V, H, W): full logits, classes on `class_dim`.
        targets: `TopKTargets` shaped like `student_logits` with V replaced by k on `class_dim`;
            `tail_mass` shaped like `student_logits` without the class dim.
        temperature: T > 0.
        mask: bool, the logits' shape without the class dim (e.g. (N, L)); False positions
            contribute nothing (padding, prompt tokens).
        class_dim: the dim that holds the classes (-1 for language models).

    Returns:
        scalar: the bucketed KL summed over the k + 1 buckets, averaged over (valid) positions, times
        T**2 (as `stillroom.losses.soft_target_loss`, which it equals when k = V).

    Buckets and temperature. The teacher's log-probabilities are stored at T = 1, so one store
    serves every temperature. At temperature T the teacher's buckets are

        p_T(i) ∝ p(i)**(1/T) for each of the k classes,  p_T(rest) ∝ tail_mass**(1/T),

    renormalised over the k + 1 buckets. For the top-k classes this is exactly softmax(logits / T)
    up to normalisation. The tail is tempered as one bucket because the individual tail
    probabilities are not stored: at T = 1 this is exact, at T > 1 it gives the tail less weight than
    tempering each tail class would (sum p_j**(1/T) >= (sum p_j)**(1/T)). The student's buckets are
    exact: its tempered probabilities on the teacher's k classes and, for "rest", the tempered mass
    on every other class, log(sum_{j not in top-k} exp(s_j / T)) - logsumexp(s / T), computed by
    masking rather than as 1 - sum so that a tiny rest keeps its precision.
    """
    if not temperature > 0:  # also rejects nan
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = student_logits.shape[class_dim]
    k = targets.indices.shape[class_dim]
    expected = list(student_logits.shape)
    expected[class_dim] = k
    if list(targets.indices.shape) != expected or targets.logprobs.shape != targets.indices.shape:
        raise ValueError(
            f"top-k targets of shape {tuple(targets.indices.shape)} do not fit student logits "
            f"{tuple(student_logits.shape)} with class_dim={class_dim}: expected {tuple(expected)}"
        )
    if k > num_classes:
        raise ValueError(f"teacher top-k has k={k} but the student has only {num_classes} classes")
    del expected[class_dim]
    if list(targets.tail_mass.shape) != expected:
        raise ValueError(
            f"tail_mass has shape {tuple(targets.tail_mass.shape)}; expected {tuple(expected)} "
            "(the logits' shape without the class dim)"
        )

    # fp32 throughout: half precision loses the small probabilities soft targets carry
    scaled = student_logits.float() / temperature
    log_z = torch.logsumexp(scaled, dim=class_dim, keepdim=True)
    student_top = scaled.gather(class_dim, targets.indices) - log_z
    teacher_top = targets.logprobs.float() / temperature
    if k < num_classes:
        rest = scaled.scatter(class_dim, targets.indices, float("-inf"))
        student_rest = torch.logsumexp(rest, dim=class_dim, keepdim=True) - log_z
        # log(0) = -inf for a teacher with no tail: that bucket then weighs 0 (0 * log 0 = 0)
        teacher_rest = targets.tail_mass.float().clamp_min(0).log().unsqueeze(class_dim)
        student_buckets = torch.cat([student_top, student_rest], dim=class_dim)
        teacher_buckets = torch.cat([teacher_top, teacher_rest / temperature], dim=class_dim)
    else:
        # k = V: no class is left over, the rest bucket is empty on both sides
        student_buckets, teacher_buckets = student_top, teacher_top
    log_p_teacher = F.log_softmax(teacher_buckets, dim=class_dim)
    kl_per_position = kl_divergence(log_p_teacher, student_buckets, dim=class_dim)
    return _masked_mean(kl_per_position, mask) * temperature**2
