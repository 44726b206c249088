"""Distillation losses for rankers: pure functions over the scores of candidate items.

Every function takes raw scores (logits) of a batch of users, one row per user and one column per
candidate item, and returns a scalar averaged over the rows. The teacher's scores are constants
(computed under no_grad); gradients flow through the student's only.

    hard_label_ranking_loss      BCE of scores to 0/1 labels (NCF, He et al. 2017)
    pointwise_soft_label_loss    BCE to the teacher's probabilities over the same candidates
    ranking_distillation_loss    the teacher's top-K items as position-weighted extra positives
                                 (Tang & Wang 2018, "Ranking Distillation", KDD)
    listwise_distillation_loss   KL between the teacher's and student's softmax over each list
    relaxed_ranking_loss         Plackett-Luce on the teacher's order of its top items, against
                                 sampled uninteresting ones (Kang et al. 2020, DE-RRD, CIKM)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_label_ranking_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of (B, K) scores against (B, K) labels in {0, 1} (observed item / sampled negative),
    the pointwise objective of neural collaborative filtering (He et al. 2017, WWW, sec. 3.1.1)."""
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def pointwise_soft_label_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """BCE of the student's sigmoid(s / T) to the teacher's sigmoid(t / T) over (B, K) candidates,
    times T**2 (Hinton et al. 2015, arXiv:1503.02531, applied per item as in CTR distillation).

    Its gradient in the student's scores is (sigmoid(s / T) - sigmoid(t / T)) * T / (B * K): zero
    where the scores agree. With teacher probabilities of exactly 0/1 it is the hard-label BCE.
    """
    soft = torch.sigmoid(teacher_scores.detach() / temperature)
    bce = F.binary_cross_entropy_with_logits(student_scores / temperature, soft)
    return bce * temperature**2


def ranking_weights(k: int, lam: float, device: torch.device | None = None) -> torch.Tensor:
    """Position importance w_r proportional to exp(-r / lam), r = 1..k, summing to 1 (Tang & Wang
    2018, sec. 3.2, eq. 5): the teacher's first items weigh most."""
    ranks = torch.arange(1, k + 1, dtype=torch.float32, device=device)
    weights = torch.exp(-ranks / lam)
    return weights / weights.sum()


def ranking_distillation_loss(
    student_scores_of_top: torch.Tensor, weights: torch.Tensor | None = None, lam: float = 1.0
) -> torch.Tensor:
    """Ranking distillation (Tang & Wang 2018, KDD, arXiv:1809.07428, eq. 3-5).

    Args:
        student_scores_of_top: (B, K) the student's scores of the teacher's top-K items for each
            user (items the user has not interacted with), in the teacher's order, best first.
        weights: (K,) or (B, K) weight of each position; default `ranking_weights(K, lam)`.
    Returns -sum_r w_r log sigmoid(s_r), averaged over users: each of the teacher's top items is
    an extra positive, the earlier ones weighing more.
    """
    if weights is None:
        k = student_scores_of_top.shape[1]
        weights = ranking_weights(k, lam, student_scores_of_top.device)
    return -(weights * F.logsigmoid(student_scores_of_top)).sum(dim=1).mean()


def listwise_distillation_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) over each user's (B, K) candidate list, times T**2,
    averaged over users: the student learns the teacher's distribution over the list (a listwise
    soft target, as ListNet's top-one probability, Cao et al. 2007, distilled). Identical scores,
    or scores that differ by a constant per row, give 0."""
    teacher = F.log_softmax(teacher_scores.detach() / temperature, dim=1)
    student = F.log_softmax(student_scores / temperature, dim=1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * temperature**2


def relaxed_ranking_loss(interesting: torch.Tensor, uninteresting: torch.Tensor) -> torch.Tensor:
    """Relaxed ranking distillation (Kang et al. 2020, DE-RRD, CIKM, arXiv:2008.03693, eq. 10).

    Args:
        interesting: (B, k) the student's scores of the teacher's top-k items, in the teacher's
            order, best first.
        uninteresting: (B, m) the student's scores of items sampled below the teacher's top ranks.
    Returns the negative log-likelihood of the teacher's order of its k items under a
    Plackett-Luce model of the student's scores, where every uninteresting item must rank below
    them but their own order is not asked for:
        -sum_r [ s_r - log( sum_{l >= r} exp(s_l) + sum_j exp(u_j) ) ], averaged over users.
    """
    # log of the suffix sums sum_{l >= r} exp(s_l), computed stably by a reversed logcumsumexp
    suffix = torch.logcumsumexp(interesting.flip(1), dim=1).flip(1)
    rest = torch.logsumexp(uninteresting, dim=1, keepdim=True)
    denominator = torch.logaddexp(suffix, rest)
    return -(interesting - denominator).sum(dim=1).mean()


__all__ = [
    "hard_label_ranking_loss",
    "listwise_distillation_loss",
    "pointwise_soft_label_loss",
    "ranking_distillation_loss",
    "ranking_weights",
    "relaxed_ranking_loss",
]
