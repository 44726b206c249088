"""Losses over intermediate representations: hints, attention transfer, hidden states, attention maps.

Every loss is a pure function, tensors in and a scalar fp32 tensor out. The only learned part is
`Projector`, which maps a student feature to the teacher's width when the two differ; it trains with
the student and is dropped at export.

Shapes:
    convolutional feature maps: (N, C, H, W), channels on dim 1;
    vectors: (N, D); token sequences: (N, L, D), width last;
    attention probabilities: (N, heads, L, L), query rows on dim 2, softmaxed over dim 3.

Teacher tensors are used as given: capture them without a graph (`Taps(..., detach=True)` or under
`torch.no_grad()`), so that the only parameters a loss reaches are the student's and its projector's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.losses.kl import kl_divergence
from stillroom.losses.logits import _masked_mean


def _shape(t: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in t)


def _check_mask(mask: torch.Tensor | None, positions: tuple[int, ...], inputs: str) -> None:
    if mask is not None and _shape(mask.shape) != positions:
        raise ValueError(
            f"mask has shape {_shape(mask.shape)} but these {inputs} need {positions}: one bool "
            "per token, True where the token is valid (e.g. the tokenizer's attention mask)"
        )


# ---------------------------------------------------------------- FitNets hints and projectors


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a (projected) student feature and a teacher feature: FitNets' hint.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (arXiv:1412.6550), eq. 3:
    1/2 ||u_h(x) - r(v_g(x))||^2, with r the learned regressor (`Projector` here). This returns the
    mean over all elements instead of the paper's half sum per sample, so the scale does not grow with
    the feature size; the two differ by a constant factor that the loss weight absorbs.

    Args:
        student_feature: (N, C, H, W), (N, D) or (N, L, D), already passed through the projector
            (`make_projector`) and, for maps, `align_spatial` when the sizes differ.
        teacher_feature: the same shape.

    Returns:
        scalar fp32: mean over every element of (student - teacher) ** 2.
    """
    s_shape, t_shape = _shape(student_feature.shape), _shape(teacher_feature.shape)
    if s_shape != t_shape:
        if len(s_shape) != len(t_shape):
            fix = (
                "tap layers of the same kind (a conv map against a conv map, tokens against tokens)"
            )
        elif s_shape[0] != t_shape[0]:
            fix = "both models must see the same batch"
        elif _feature_width(s_shape) != _feature_width(t_shape):
            fix = "project the student first: make_projector(student.shape, teacher.shape)"
        elif len(s_shape) == 4:
            fix = "resize the student map first: align_spatial(student, teacher.shape[-2:])"
        else:
            fix = "both models must see the same tokens (same tokenizer and sequence length)"
        raise ValueError(
            f"student feature {s_shape} and teacher feature {t_shape} differ in shape: {fix}"
        )
    # fp32: the squared differences of half-precision activations overflow or lose their low bits
    return (student_feature.float() - teacher_feature.float()).pow(2).mean()


def _feature_width(shape: tuple[int, ...]) -> int:
    """Channels of an (N, C, H, W) map, the last dim of (N, D) and (N, L, D) features."""
    return shape[1] if len(shape) == 4 else shape[-1]


class Projector(nn.Module):
    """Learned map from the student's width to the teacher's (the FitNets regressor).

    An `nn.Linear` over the last dim for (N, D) and (N, L, D) features; a 1x1 `nn.Conv2d` over the
    channels for (N, C, H, W) maps, so each position is projected alike and spatial sizes are kept.
    It is trained together with the student (its parameters belong in the student's optimizer) and
    is not part of the exported student.
    """

    def __init__(self, student_width: int, teacher_width: int, spatial: bool) -> None:
        super().__init__()
        if student_width < 1 or teacher_width < 1:
            raise ValueError(
                f"widths must be >= 1, got student {student_width}, teacher {teacher_width}"
            )
        self.spatial = spatial
        self.layer: nn.Module = (
            nn.Conv2d(student_width, teacher_width, kernel_size=1)
            if spatial
            else nn.Linear(student_width, teacher_width)
        )

    def forward(self, student_feature: torch.Tensor) -> torch.Tensor:
        if self.spatial and student_feature.dim() != 4:
            raise ValueError(
                f"this projector maps (N, C, H, W) maps, got shape {_shape(student_feature.shape)}"
            )
        if not self.spatial and student_feature.dim() not in (2, 3):
            raise ValueError(
                "this projector maps (N, D) or (N, L, D) features, got shape "
                f"{_shape(student_feature.shape)}"
            )
        return self.layer(student_feature)


def make_projector(
    student_shape: Sequence[int] | torch.Size, teacher_shape: Sequence[int] | torch.Size
) -> nn.Module:
    """The projector a student feature needs to be compared with a teacher feature.

    Build it once, from the shapes of the features the two models produce for one batch (a dry-run
    forward pass through the taps), before the optimizer is created so that its parameters can be
    handed to it. Only the width matters: the batch size is ignored, spatial sizes are matched
    separately by `align_spatial`.

    Args:
        student_shape, teacher_shape: full feature shapes with the batch dim, both (N, C, H, W),
            both (N, D) or both (N, L, D).

    Returns:
        `nn.Identity()` when the widths already match (nothing to learn), otherwise a `Projector`:
        1x1 conv from C_s to C_t channels for maps, linear from D_s to D_t for vectors and tokens.
    """
    s_shape, t_shape = _shape(student_shape), _shape(teacher_shape)
    if len(s_shape) not in (2, 3, 4) or len(s_shape) != len(t_shape):
        raise ValueError(
            f"cannot project a student feature of shape {s_shape} onto a teacher feature of shape "
            f"{t_shape}: both must be (N, C, H, W), both (N, D) or both (N, L, D)"
        )
    s_width, t_width = _feature_width(s_shape), _feature_width(t_shape)
    if s_width == t_width:
        return nn.Identity()
    return Projector(s_width, t_width, spatial=len(s_shape) == 4)


def align_spatial(student_map: torch.Tensor, teacher_size: Sequence[int]) -> torch.Tensor:
    """Resize a student map (N, C, H_s, W_s) to the teacher's spatial size (H_t, W_t).

    - equal sizes: returned unchanged;
    - student at least as large in both dims: adaptive average pooling, so every teacher position is
      compared with the mean of the student positions it covers (no student activation is skipped,
      as strided subsampling would);
    - otherwise (student smaller in some dim): bilinear interpolation (`align_corners=False`).
      When one dim is larger and the other smaller, bilinear resamples both; along a dim shrunk by
      an integer factor of 2 this equals average pooling.

    Both operations are linear and averaging (weights sum to 1), so they commute with a 1x1
    projector: pool first, project second is the cheaper order. Gradients flow to the student.

    Args:
        student_map: (N, C, H_s, W_s).
        teacher_size: (H_t, W_t), e.g. `teacher_map.shape[-2:]`.

    Returns:
        (N, C, H_t, W_t), in the student's dtype.
    """
    if student_map.dim() != 4:
        raise ValueError(
            f"align_spatial resizes (N, C, H, W) maps, got shape {_shape(student_map.shape)}"
        )
    size = _shape(teacher_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"teacher_size must be (H, W) with positive sizes, got {size}")
    student_size = _shape(student_map.shape[-2:])
    if student_size == size:
        return student_map
    if student_size[0] >= size[0] and student_size[1] >= size[1]:
        return F.adaptive_avg_pool2d(student_map, size)
    return F.interpolate(student_map, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- attention transfer


def _spatial_attention(feature_map: torch.Tensor, p: float) -> torch.Tensor:
    """Q = sum_c |A_c|^p, flattened and L2-normalised per sample: (N, C, *spatial) -> (N, prod)."""
    attention = feature_map.float().abs().pow(p).sum(dim=1).flatten(start_dim=1)
    # F.normalize clamps the norm at eps: an all-zero map (dead ReLUs) gives 0, not nan
    return F.normalize(attention, p=2.0, dim=1)


def attention_transfer_loss(
    student_map: torch.Tensor, teacher_map: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    """Activation-based attention transfer, Zagoruyko & Komodakis 2017 (arXiv:1612.03928).

    The attention map of an activation A (N, C, H, W) is Q = sum_c |A_c|^p (the paper's F^p_sum,
    eq. 2), flattened to (N, H*W) and divided by its L2 norm per sample. The paper's loss (eq. 2) is
    beta/2 * sum over layer pairs of || Q_s/||Q_s|| - Q_t/||Q_t|| ||_2; this returns what the
    authors' code computes and most toolkits follow, `(q_s - q_t).pow(2).mean()`: the squared
    difference averaged over the batch and the H*W positions, i.e.
    (1/N) sum_n ||q_s,n - q_t,n||_2^2 / (H*W). The paper's beta = 1000 "divided by the number of
    elements in the attention map and batch size" is this mean; the authors' code (and e.g.
    mdistiller) weights it by 1000 per layer pair, a weight the caller sets.

    Channels may differ between student and teacher (the sum over channels removes them; no
    projector is needed). The normalisation makes the loss invariant to a positive scaling of either
    map.

    Args:
        student_map: (N, C_s, H, W) (any (N, C, *spatial) works).
        teacher_map: (N, C_t, H, W), the same spatial size: use `align_spatial` on the student
            otherwise.
        p: exponent of the attention map, > 0; the paper uses 2.

    Returns:
        scalar fp32.
    """
    if student_map.dim() < 3 or teacher_map.dim() != student_map.dim():
        raise ValueError(
            f"attention transfer compares (N, C, H, W) maps, got student "
            f"{_shape(student_map.shape)} and teacher {_shape(teacher_map.shape)}"
        )
    s_shape, t_shape = _shape(student_map.shape), _shape(teacher_map.shape)
    if s_shape[0] != t_shape[0] or s_shape[2:] != t_shape[2:]:
        raise ValueError(
            f"student map {s_shape} and teacher map {t_shape} must agree in batch and spatial "
            "size (channels may differ): resize the student with "
            "align_spatial(student, teacher.shape[-2:])"
        )
    if not p > 0:  # also rejects nan
        raise ValueError(f"p must be > 0, got {p}")
    diff = _spatial_attention(student_map, p) - _spatial_attention(teacher_map, p)
    return diff.pow(2).mean()


# ---------------------------------------------------------------- transformer hidden states


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    kind: Literal["mse", "cosine"] = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between student and teacher hidden states, averaged over the valid tokens.

    - "mse": TinyBERT (Jiao et al. 2020, arXiv:1909.10351, eq. 8), MSE(H_s W_h, H_t): the squared
      error averaged over D, then over the valid tokens (the element mean over valid tokens).
    - "cosine": DistilBERT (Sanh et al. 2019, arXiv:1910.01108), the cosine embedding loss
      1 - cos(h_s, h_t) over D, averaged over the valid tokens; it aligns directions only and is
      invariant to scaling either hidden state by a positive factor.

    Args:
        student_hidden: (N, L, D) (or (N, D)), projected to the teacher's width (`make_projector`)
            when the widths differ.
        teacher_hidden: the same shape.
        kind: "mse" or "cosine".
        mask: bool (N, L), True for valid tokens; padding contributes nothing. A batch without a
            valid token gives 0.

    Returns:
        scalar fp32.
    """
    s_shape, t_shape = _shape(student_hidden.shape), _shape(teacher_hidden.shape)
    if s_shape != t_shape:
        fix = (
            "project the student first: make_projector(student.shape, teacher.shape)"
            if len(s_shape) == len(t_shape) and s_shape[:-1] == t_shape[:-1]
            else "both models must see the same tokens (same tokenizer and sequence length)"
        )
        raise ValueError(
            f"student hidden states {s_shape} and teacher hidden states {t_shape} differ in "
            f"shape: {fix}"
        )
    if student_hidden.dim() < 2:
        raise ValueError(f"hidden states must be (N, L, D) or (N, D), got shape {s_shape}")
    _check_mask(mask, s_shape[:-1], "hidden states")
    student, teacher = student_hidden.float(), teacher_hidden.float()
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    return _masked_mean(per_token, mask)


# ---------------------------------------------------------------- self-attention distributions


def attention_map_kl(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) between self-attention distributions, per query row.

    MiniLM (Wang et al. 2020, arXiv:2002.10957, eq. 1): for each head a and query position t,
    KL(A^T_{a,t} || A^S_{a,t}), averaged over the heads and the valid query rows. (TinyBERT,
    arXiv:1909.10351 eq. 7, regresses the attention matrices with MSE instead; this is the KL form.)

    Heads must match. Comparing a student with fewer heads head-by-head is undefined; to compare
    anyway, average both over heads first (`attn.mean(dim=1, keepdim=True)` is still a distribution
    per row), or use MiniLMv2-style relations (not provided here).

    Args:
        student_attn: (N, heads, L, L) attention probabilities, each query row (dim 2) already
            softmaxed over the keys (dim 3).
        teacher_attn: the same shape.
        mask: bool (N, L), True for valid tokens. Rows of padding queries contribute nothing; padding
            keys carry no teacher probability (the model masked them before its softmax), and a
            zero teacher probability adds 0 by the convention 0 * log 0 = 0.

    Returns:
        scalar fp32: the KL summed over keys, averaged over heads and valid query rows.
    """
    s_shape, t_shape = _shape(student_attn.shape), _shape(teacher_attn.shape)
    if len(s_shape) != 4 or s_shape[2] != s_shape[3] or len(t_shape) != 4:
        raise ValueError(
            f"attention maps must be (N, heads, L, L), got student {s_shape} and teacher {t_shape}"
        )
    if s_shape != t_shape:
        fix = (
            "the number of heads differs: average both over heads first "
            "(attn.mean(dim=1, keepdim=True))"
            if s_shape[0] == t_shape[0] and s_shape[2:] == t_shape[2:]
            else "both models must see the same tokens (same tokenizer and sequence length)"
        )
        raise ValueError(
            f"student attention {s_shape} and teacher attention {t_shape} differ in shape: {fix}"
        )
    n, heads, length, _ = s_shape
    _check_mask(mask, (n, length), "attention maps")
    # fp32: the logs of small probabilities and the sum over L keys lose their precision in half
    p_teacher, p_student = teacher_attn.float(), student_attn.float()
    # clamp: a student probability that underflowed to 0 where the teacher's is positive would give
    # an infinite loss; the smallest normal float bounds the term instead (and keeps log's
    # gradient finite at the teacher's zeros, which the where below drops)
    tiny = torch.finfo(torch.float32).tiny
    log_p, log_q = p_teacher.clamp_min(tiny).log(), p_student.clamp_min(tiny).log()
    kl_per_row = kl_divergence(log_p, log_q, p=p_teacher)  # (N, heads, L); p = 0 rows add 0
    row_mask = None if mask is None else mask.bool()[:, None, :].expand(n, heads, length)
    return _masked_mean(kl_per_row, row_mask)


# ---------------------------------------------------------------- which layers to pair


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Pair each student layer with a teacher layer, spread uniformly: TinyBERT's g(m) = m * N / M.

    Jiao et al. 2020 (arXiv:1909.10351), section 3.1. Indices are 0-based transformer layers (the
    embedding layer, TinyBERT's m = 0, is left to the caller): student layer i is paired with teacher
    layer (i + 1) * T // S - 1, so the last student layer always meets the last teacher layer.
    E.g. 4 student / 12 teacher layers -> [(0, 2), (1, 5), (2, 8), (3, 11)].

    Args:
        num_student_layers: S >= 1.
        num_teacher_layers: T >= S (a student deeper than its teacher has no uniform map; pass an
            explicit list of pairs instead).

    Returns:
        [(student_layer, teacher_layer), ...], S pairs, teacher layers strictly increasing.
    """
    for name, value in (
        ("num_student_layers", num_student_layers),
        ("num_teacher_layers", num_teacher_layers),
    ):
        # bool is an int subclass; True as a layer count is always a mistake
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"a uniform layer map needs no more student layers than teacher layers, got "
            f"{num_student_layers} student and {num_teacher_layers} teacher layers; "
            "give the (student, teacher) layer pairs explicitly instead"
        )
    return [
        (i, (i + 1) * num_teacher_layers // num_student_layers - 1)
        for i in range(num_student_layers)
    ]
