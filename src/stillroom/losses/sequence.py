"""Token-level distillation for language models: forward KL, reverse KL and the generalized JSD.

Outputs are (N, L, V): batch, sequence positions, vocabulary last. Every loss compares the teacher's
next-token distribution P with the student's Q at each position and averages over the valid
(unmasked) tokens.

`beta` picks the divergence, as in GKD (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv:2306.13649) and TRL's `generalized_jsd_loss`:

    beta = 0:      KL(P || Q), forward KL (Hinton et al. 2015's soft targets, mean-seeking);
    beta = 1:      KL(Q || P), reverse KL (mode-seeking, as in MiniLLM, arXiv:2306.08543);
    0 < beta < 1:  JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta*P + (1-beta)*Q.

At beta = 0.5 this is the ordinary Jensen-Shannon divergence, symmetric and at most log 2. For
0 < beta < 1 the value is at most the binary entropy H(beta) and tends to 0 at either end, so the two
ends are defined as the KLs above rather than as limits: the value is not continuous in beta.

Temperature T softens both sides, P = softmax(z_t / T) and Q = softmax(z_s / T); the losses multiply
the mean by T**2 (Hinton scaling, as `soft_target_loss`), `token_divergence` does not.

Memory. A (N, L, V) fp32 tensor is large for a real vocabulary (8 x 2048 x 49,152 x 4 bytes = 3.2 GB),
and the loss makes several: the upcasts, the log-softmaxes, the mixture. With `chunk_size`, the
positions are processed `chunk_size` at a time (all N at once) under activation checkpointing, so
only one chunk's fp32 tensors exist at a time and backward recomputes each chunk instead of keeping
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stillroom.losses.kl import kl_divergence
from stillroom.losses.logits import _masked_mean
from stillroom.losses.topk import TopKTargets

_LOG_FLOOR = -1e30
"""Stands in for log 0 in the mixture: exp of it is 0, and unlike -inf its gradient is not nan."""


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD between teacher P and student Q (module docstring), (..., C) -> (...)."""
    if beta == 0.0:
        return kl_divergence(log_p, log_q)
    if beta == 1.0:
        return kl_divergence(log_q, log_p)
    # M in log space; the floor keeps a token both models rule out (-inf on both sides) from
    # giving logaddexp a nan gradient
    log_m = torch.logaddexp(
        log_p.clamp_min(_LOG_FLOOR) + math.log(beta),
        log_q.clamp_min(_LOG_FLOOR) + math.log1p(-beta),
    )
    return beta * kl_divergence(log_p, log_m) + (1.0 - beta) * kl_divergence(log_q, log_m)


def _dense_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    # fp32: half precision loses the small probabilities the soft targets carry
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _divergence(log_p, log_q, beta)


def _topk_divergence(
    student_logits: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    tail_mass: torch.Tensor,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    scaled = student_logits.float() / temperature
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
    student_top = scaled.gather(-1, indices) - log_z
    teacher_top = logprobs.float() / temperature
    if indices.shape[-1] < scaled.shape[-1]:
        # the student's rest by masking, not log1p(-sum p_top): that rounds to log 0 in fp32 as soon
        # as the top k hold all but ~1e-7 of the mass, and a tiny rest is common for a peaked student
        rest = scaled.scatter(-1, indices, float("-inf"))
        student_rest = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z
        # a stored tail of 0 is underflow, not a teacher ruling out every other token: log 0 would
        # make reverse KL infinite, so floor it at the smallest normal fp32
        tiny = torch.finfo(torch.float32).tiny
        teacher_rest = tail_mass.float().clamp_min(tiny).log().unsqueeze(-1) / temperature
        student_top = torch.cat([student_top, student_rest], dim=-1)
        teacher_top = torch.cat([teacher_top, teacher_rest], dim=-1)
    # else k = V: no token is left over, so there is no rest bucket on either side
    return _divergence(F.log_softmax(teacher_top, dim=-1), student_top, beta)


def _check_settings(beta: float, temperature: float, chunk_size: int | None) -> None:
    if not 0.0 <= beta <= 1.0:  # also rejects nan
        raise ValueError(
            f"beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: generalized JSD), "
            f"got {beta}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not chunk_size >= 1):
        raise ValueError(f"chunk_size must be a whole number of positions >= 1, got {chunk_size}")


def _check_vocab(student: tuple[int, ...], teacher: tuple[int, ...], what: str) -> None:
    if student == teacher:
        return
    if student[:-1] == teacher[:-1]:
        fix = (
            f"the vocab sizes differ (student {student[-1]}, teacher {teacher[-1]}): distillation "
            "needs the same tokenizer on both sides; check the tokenizer/vocab of the two models, "
            "and if one LM head is only padded to a rounder size, slice both to the real vocabulary"
        )
    else:
        fix = "both models must see the same tokens (same batch, tokenizer and sequence length)"
    raise ValueError(
        f"student {what} {student} and teacher {what} {teacher} differ in shape: {fix}"
    )


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(
            f"student logits have shape {_shape(student_logits)}; expected (N, L, V): batch, "
            "sequence, vocabulary last"
        )
    _check_vocab(_shape(student_logits), _shape(teacher_logits), "logits")


def _check_topk(student_logits: torch.Tensor, targets: TopKTargets) -> None:
    positions, vocab = _shape(student_logits)[:-1], student_logits.shape[-1]
    k = targets.indices.shape[-1]
    shapes = tuple(_shape(t) for t in (targets.logprobs, targets.indices, targets.tail_mass))
    if student_logits.dim() != 3 or shapes != ((*positions, k), (*positions, k), positions):
        raise ValueError(
            f"top-k targets with logprobs {shapes[0]}, indices {shapes[1]} and tail_mass "
            f"{shapes[2]} do not fit student logits {_shape(student_logits)}: expected (N, L, V) "
            f"logits with (N, L, k), (N, L, k) and (N, L) targets"
        )
    if k > vocab:
        raise ValueError(
            f"teacher top-k has k={k} but the student has only {vocab} vocabulary entries: "
            "check that both models use the same tokenizer/vocab"
        )


def _check_mask(mask: torch.Tensor | None, positions: tuple[int, ...]) -> None:
    if mask is not None and _shape(mask) != positions:
        raise ValueError(
            f"mask has shape {_shape(mask)} but the logits need {positions} (N, L): one bool per "
            "token, True where it counts (e.g. the attention mask, or response tokens only)"
        )


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token generalized JSD between teacher and student (GKD, arXiv:2306.13649), no reduction.

    Args:
        student_logits, teacher_logits: (N, L, V), any float dtype (upcast to fp32 inside).
        beta: 0 forward KL(P || Q), 1 reverse KL(Q || P), in between JSD_beta with
            M = beta*P + (1-beta)*Q (module docstring; 0.5 is the ordinary JSD).
        temperature: T > 0; P = softmax(teacher / T), Q = softmax(student / T).

    Returns:
        (N, L) fp32: the divergence summed over the vocabulary at each position, without T**2.
    """
    _check_settings(beta, temperature, None)
    _check_logits(student_logits, teacher_logits)
    return _dense_divergence(student_logits, teacher_logits, beta, temperature)


def topk_token_divergence(
    student_logits: torch.Tensor,
    targets: TopKTargets,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`token_divergence` against a stored top-k teacher, on k + 1 buckets, (N, L, V) -> (N, L).

    The buckets are the teacher's k tokens and one "rest" bucket for all others, as in
    `stillroom.losses.topk.topk_soft_target_loss`, which this equals at beta = 0; it is the full
    divergence when k = V. The teacher was stored at T = 1: at temperature T its k log-probs are
    divided by T and renormalised together with the rest bucket taken as one token of log-prob
    log(tail_mass). That is exact at T = 1 and an approximation at T > 1 (the individual tail
    probabilities are not stored, so the tail is tempered as a whole). The student's buckets are
    exact: log_softmax(z / T) at the k ids, and the log of its tempered mass on every other id.

    Args:
        student_logits: (N, L, V) full logits.
        targets: `TopKTargets` with logprobs and indices (N, L, k), tail_mass (N, L), at T = 1.
        beta, temperature: as `token_divergence`.
    """
    _check_settings(beta, temperature, None)
    _check_topk(student_logits, targets)
    return _topk_divergence(
        student_logits, targets.logprobs, targets.indices, targets.tail_mass, beta, temperature
    )


def _masked_sum(
    per_token: Callable[..., torch.Tensor], valid: torch.Tensor, *inputs: torch.Tensor
) -> torch.Tensor:
    # where, not multiply: a non-finite value at a masked position must not leak in as 0 * inf
    return torch.where(valid, per_token(*inputs), 0.0).sum()


def _chunked_mean(
    per_token: Callable[..., torch.Tensor],
    sliced: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Mean of per_token(*chunks) over the valid tokens, `chunk_size` positions at a time.

    `sliced` are (N, L, ...) tensors cut along L. Each chunk runs under activation checkpointing, so its fp32 intermediates are dropped after its
    forward and recomputed in backward: at most one chunk's worth exists at a time.
    """
    n, length = sliced[0].shape[:2]
    device = sliced[0].device
    valid = torch.ones(n, length, dtype=torch.bool, device=device) if mask is None else mask.bool()
    total = torch.zeros((), device=device)
    for start in range(0, length, chunk_size):
        window = slice(start, start + chunk_size)
        chunks = [x[:, window] for x in sliced]
        # no dropout or sampling inside, so there is no RNG state to save for the recomputation
        total = total + checkpoint(
            _masked_sum,
            per_token,
            valid[:, window],
            *chunks,
            use_reentrant=False,
            preserve_rng_state=False,
        )
    # clamp: a batch with no valid token gives 0, not nan, and keeps the graph intact
    return total / valid.sum().clamp_min(1)


def token_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTargets,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean per-token generalized JSD (GKD, arXiv:2306.13649) over the valid tokens, times T**2.

    Args:
        student_logits: (N, L, V), any float dtype (computed in fp32).
        teacher_logits: (N, L, V) logits, or `TopKTargets` from a store (k + 1 buckets, see
            `topk_token_divergence`).
        mask: bool (N, L); False tokens contribute nothing (padding, prompt tokens). None: all count.
        beta: 0 forward KL(P || Q), 1 reverse KL(Q || P), in between JSD_beta with
            M = beta*P + (1-beta)*Q (module docstring; 0.5 is the ordinary JSD).
        temperature: T > 0, applied to both sides; the mean is multiplied by T**2 so gradient
            magnitudes stay comparable across temperatures (Hinton et al. 2015, arXiv:1503.02531).
        chunk_size: if set, positions are processed this many at a time under activation
            checkpointing (module docstring), trading one extra forward pass of the loss for never
            holding the fp32 (N, L, V) intermediates; the value and gradients are unchanged.

    Returns:
        scalar fp32. At beta = 0 with full logits this equals
        `soft_target_loss(student, teacher, T, mask, class_dim=-1)`.
    """
    _check_settings(beta, temperature, chunk_size)
    if isinstance(teacher_logits, TopKTargets):
        _check_topk(student_logits, teacher_logits)
        per_token = partial(_topk_divergence, beta=beta, temperature=temperature)
        sliced = [student_logits, teacher_logits.logprobs, teacher_logits.indices]
        sliced.append(teacher_logits.tail_mass)
    else:
        _check_logits(student_logits, teacher_logits)
        per_token = partial(_dense_divergence, beta=beta, temperature=temperature)
        sliced = [student_logits, teacher_logits]
    _check_mask(mask, _shape(student_logits)[:2])
    if chunk_size is None:
        return _masked_mean(per_token(*sliced), mask) * temperature**2
    return _chunked_mean(per_token, sliced, mask, chunk_size) * temperature**2
