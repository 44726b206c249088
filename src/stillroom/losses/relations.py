"""Relational knowledge distillation: match how the samples of a batch sit relative to each other.

Park et al. 2019, "Relational Knowledge Distillation" (arXiv:1904.05068). Instead of matching each
sample's embedding to the teacher's, RKD matches structure within the batch: the distances between
pairs of samples (normalised by their mean) and the angles formed by triplets. Both are invariant to
rotating, translating and (for distances after normalisation; for angles always) scaling an
embedding, so student and teacher widths may differ and no projector is needed.

Both functions are pure: embeddings (N, D_s) and (N, D_t) in, a scalar fp32 tensor out. Teacher
embeddings are used as given: capture them without a graph. The batch is the set of samples related:
the loss depends on the batch size and composition, and needs at least 2 (distance) or 3 (angle)
samples.

Averaging: the paper sums over its sets of pairs and triplets of *distinct* samples (X^2, X^3), and
these functions average over exactly those. The authors' code averages over all N^2 pairs and N^3
triplets, including degenerate ones that contribute 0, so its values are smaller by the factors
(N - 1)/N and (N - 1)(N - 2)/N^2. Loss weights tuned with that code carry over: the difference
is a few percent at common batch sizes (2% and 5% at N = 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12
"""Floor for the mean distance: a batch of identical embeddings has mean 0, and no pair to scale."""


def _check_embeddings(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, min_samples: int, term: str
) -> None:
    if student_emb.dim() != 2 or teacher_emb.dim() != 2:
        raise ValueError(
            f"RKD relates embeddings (N, D), got student {tuple(student_emb.shape)} and teacher "
            f"{tuple(teacher_emb.shape)}: flatten feature maps first (e.g. after global pooling)"
        )
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(
            f"student has {student_emb.shape[0]} embeddings and teacher {teacher_emb.shape[0]}: "
            "both models must embed the same batch (their widths may differ)"
        )
    if student_emb.shape[0] < min_samples:
        raise ValueError(
            f"the RKD {term} loss relates at least {min_samples} samples, got a batch of "
            f"{student_emb.shape[0]}"
        )


def _distance_potentials(embeddings: torch.Tensor) -> torch.Tensor:
    """psi_D for every pair i < j: ||e_i - e_j||_2 / mu, mu the mean over the pairs. (N, D) -> (P,)."""
    n = embeddings.shape[0]
    # direct differences, not the |a|^2 + |b|^2 - 2ab expansion, which cancels catastrophically
    # for close points with large norms; cdist's backward also gives 0, not nan, at distance 0
    distances = torch.cdist(
        embeddings[None], embeddings[None], compute_mode="donot_use_mm_for_euclid_dist"
    )[0]
    rows, cols = torch.triu_indices(n, n, offset=1, device=embeddings.device)
    # the pairs i < j: the matrix is symmetric and its diagonal is no pair
    pair_distances = distances[rows, cols]
    return pair_distances / pair_distances.mean().clamp_min(_EPS)


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber loss between the student's and the teacher's normalised pairwise distances.

    Park et al. 2019 (arXiv:1904.05068), eqs. 4-5: psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu with
    mu the mean distance over the distinct pairs of the batch; the loss is the Huber loss
    (smooth L1 with delta = 1) between psi_D of student and teacher, averaged over the distinct
    pairs. Invariant to a global scaling, rotation and translation of either embedding.

    Memory O(N^2) for the distance matrix.

    Args:
        student_emb: (N, D_s), N >= 2.
        teacher_emb: (N, D_t); D_t may differ from D_s.

    Returns:
        scalar fp32.
    """
    _check_embeddings(student_emb, teacher_emb, min_samples=2, term="distance")
    student_potentials = _distance_potentials(student_emb.float())
    teacher_potentials = _distance_potentials(teacher_emb.float())
    return F.smooth_l1_loss(student_potentials, teacher_potentials, beta=1.0)


def _angle_potentials(embeddings: torch.Tensor) -> torch.Tensor:
    """psi_A for every triplet of distinct samples. (N, D) -> (N * (N - 1) * (N - 2),).

    Entry [j, i, k] of the cube below is cos of the angle at vertex e_j between e_i - e_j and
    e_k - e_j: <(e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j||>.
    """
    n = embeddings.shape[0]
    differences = embeddings[None, :, :] - embeddings[:, None, :]  # [j, i] = e_i - e_j: (N, N, D)
    lengths = torch.linalg.vector_norm(differences, dim=2, keepdim=True)  # (N, N, 1)
    # a zero-length arm (e_j - e_j, or two coincident samples) has no direction: its unit vector is
    # 0 with zero gradient. F.normalize would also give 0, but with a gradient of 1/eps = 1e12
    # that a duplicated sample or a collapsed student embedding would blow up training with
    has_length = lengths > 0
    unit = torch.where(has_length, differences / torch.where(has_length, lengths, 1.0), 0.0)
    cosines = unit @ unit.transpose(1, 2)  # (N, N, N)
    same = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    # degenerate triplets (a repeated sample) are no angle: i == j, k == j or i == k
    distinct = ~(same[:, :, None] | same[:, None, :] | same[None, :, :])
    return cosines[distinct]


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber loss between the student's and the teacher's triplet angles.

    Park et al. 2019 (arXiv:1904.05068), eqs. 6-7: psi_A(t_i, t_j, t_k) = cos angle t_i t_j t_k
    = <e^ij, e^kj> with e^ij = (t_i - t_j) / ||t_i - t_j||_2; the loss is the Huber loss (smooth L1
    with delta = 1) between psi_A of student and teacher, averaged over the triplets of distinct
    samples. Invariant to scaling, rotation and translation of either embedding. Two coincident
    samples (a zero-length arm) form no angle: its cosine is taken as 0, with zero gradient.

    Memory: O(N^2 * D) for the pairwise differences and O(N^3) for the cosines of all triplets (and
    as much again for their gradients), e.g. 128^3 = 2.1M floats, but 512^3 = 134M floats (0.5 GB)
    per copy. Subsample the batch for this term if it is large.

    Args:
        student_emb: (N, D_s), N >= 3.
        teacher_emb: (N, D_t); D_t may differ from D_s.

    Returns:
        scalar fp32.
    """
    _check_embeddings(student_emb, teacher_emb, min_samples=3, term="angle")
    student_potentials = _angle_potentials(student_emb.float())
    teacher_potentials = _angle_potentials(teacher_emb.float())
    return F.smooth_l1_loss(student_potentials, teacher_potentials, beta=1.0)
