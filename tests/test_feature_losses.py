"""Feature losses against references written from the papers' formulas, and their limiting cases."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attention_probs(n: int, heads: int, length: int, seed: int, valid_lengths=None) -> torch.Tensor:
    """Softmaxed attention (N, heads, L, L); keys past a sample's valid length get probability 0."""
    scores = 2 * randn(n, heads, length, length, seed=seed)
    if valid_lengths is not None:
        for i, valid in enumerate(valid_lengths):
            scores[i, :, :, valid:] = float("-inf")
    return torch.softmax(scores, dim=-1)


# ---------------------------------------------------------------- hint_loss


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 8), (2, 3, 4, 5)])
def test_hint_loss_is_the_element_mean_of_squared_differences(shape):
    student, teacher = randn(*shape, seed=1), randn(*shape, seed=2)
    squares = [(s - t) ** 2 for s, t in zip(student.flatten(), teacher.flatten(), strict=True)]
    expected = sum(squares) / math.prod(shape)
    torch.testing.assert_close(hint_loss(student, teacher), expected)


def test_hint_loss_is_fitnets_half_squared_norm_up_to_a_constant():
    # FitNets eq. 3: 1/2 ||u_h - r(v_g)||^2 per sample; the mean over elements divides the sum by
    # N * (elements per sample) and drops the 1/2
    n, c, h, w = 3, 4, 5, 5
    student, teacher = randn(n, c, h, w, seed=3), randn(n, c, h, w, seed=4)
    paper = torch.stack([0.5 * ((student[i] - teacher[i]) ** 2).sum() for i in range(n)]).mean()
    torch.testing.assert_close(hint_loss(student, teacher), paper * 2 / (c * h * w))


def test_hint_loss_identical_features_give_zero():
    x = randn(2, 3, 4, 4)
    assert hint_loss(x, x.clone()).item() == 0.0


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "match"),
    [
        ((2, 8, 4, 4), (2, 16, 4, 4), "make_projector"),
        ((2, 16, 8, 8), (2, 16, 4, 4), "align_spatial"),
        ((2, 5, 8), (2, 6, 8), "same tokens"),
        ((2, 16), (2, 16, 4, 4), "same kind"),
        ((3, 16), (2, 16), "same batch"),
    ],
)
def test_hint_loss_shape_mismatch_says_how_to_fix_it(student_shape, teacher_shape, match):
    with pytest.raises(ValueError, match=match):
        hint_loss(torch.zeros(student_shape), torch.zeros(teacher_shape))


def test_hint_loss_half_precision_computed_in_fp32():
    student, teacher = randn(4, 32, seed=5), randn(4, 32, seed=6)
    loss = hint_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    expected = ((student.bfloat16().float() - teacher.bfloat16().float()) ** 2).mean()
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------- projectors


def test_make_projector_is_linear_for_vectors_and_tokens():
    for student_shape, teacher_shape in [((4, 8), (4, 12)), ((2, 5, 8), (2, 5, 12))]:
        projector = make_projector(student_shape, teacher_shape)
        assert isinstance(projector, Projector)
        assert isinstance(projector.layer, nn.Linear)
        assert (projector.layer.in_features, projector.layer.out_features) == (8, 12)
        x = randn(*student_shape, seed=7)
        out = projector(x)
        assert out.shape == teacher_shape
        # each vector / token is mapped alike: W x + b
        weight, bias = projector.layer.weight, projector.layer.bias
        expected = torch.stack([weight @ v + bias for v in x.reshape(-1, 8)]).reshape(out.shape)
        torch.testing.assert_close(out, expected)


def test_make_projector_is_conv1x1_for_maps():
    projector = make_projector(torch.Size([2, 8, 6, 6]), torch.Size([2, 16, 3, 3]))
    assert isinstance(projector, Projector)
    conv = projector.layer
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 16, (1, 1))
    x = randn(2, 8, 6, 6, seed=8)
    out = projector(x)
    assert out.shape == (2, 16, 6, 6)  # spatial size kept; align_spatial handles it
    weight = conv.weight[:, :, 0, 0]  # (16, 8)
    for i, j in [(0, 0), (3, 5), (5, 2)]:
        torch.testing.assert_close(out[1, :, i, j], weight @ x[1, :, i, j] + conv.bias)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((4, 8), (4, 8)), ((2, 5, 8), (2, 5, 8)), ((2, 8, 6, 6), (2, 8, 3, 3)), ((4, 8), (32, 8))],
)
def test_make_projector_is_identity_when_widths_match(student_shape, teacher_shape):
    assert isinstance(make_projector(student_shape, teacher_shape), nn.Identity)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [
        ((4, 8), (4, 2, 8)),
        ((2, 8, 4, 4), (2, 8, 4)),
        ((2, 1, 8, 4, 4), (2, 1, 16, 4, 4)),
        ((8,), (8,)),
    ],
)
def test_make_projector_rejects_incompatible_ranks(student_shape, teacher_shape):
    with pytest.raises(ValueError, match="cannot project"):
        make_projector(student_shape, teacher_shape)


def test_projector_rejects_features_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Projector(8, 16, spatial=True)(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        Projector(8, 16, spatial=False)(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match="widths"):
        Projector(0, 16, spatial=False)


def test_gradients_reach_the_student_and_the_projector_only():
    torch.manual_seed(0)
    student = nn.Conv2d(3, 8, 3, padding=1)
    teacher = nn.Conv2d(3, 16, 3, padding=1, stride=2)
    x = randn(2, 3, 8, 8, seed=9)
    with torch.no_grad():  # how the loop runs its teacher
        teacher_map = teacher(x)
    student_map = student(x)
    projector = make_projector(student_map.shape, teacher_map.shape)
    aligned = align_spatial(student_map, teacher_map.shape[-2:])
    (
        hint_loss(projector(aligned), teacher_map) + attention_transfer_loss(aligned, teacher_map)
    ).backward()
    for param in [*student.parameters(), *projector.parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(param.grad is None for param in teacher.parameters())


# ---------------------------------------------------------------- align_spatial


def test_align_spatial_same_size_is_a_no_op():
    x = randn(2, 3, 4, 4)
    assert align_spatial(x, (4, 4)) is x


def test_align_spatial_down_is_average_pooling_over_blocks():
    x = randn(2, 3, 8, 6, seed=10)
    expected = x.reshape(2, 3, 4, 2, 3, 2).mean(dim=(3, 5))  # 2x2 blocks
    torch.testing.assert_close(align_spatial(x, (4, 3)), expected)


def test_align_spatial_down_uneven_uses_adaptive_bins():
    # adaptive pooling of 5 -> 2 averages rows [0, 3) and [2, 5): bin i is [floor(5i/2), ceil(5(i+1)/2))
    x = randn(1, 2, 5, 5, seed=11)
    bins = [(0, 3), (2, 5)]
    expected = torch.empty(1, 2, 2, 2)
    for a, (r0, r1) in enumerate(bins):
        for b, (c0, c1) in enumerate(bins):
            expected[:, :, a, b] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    torch.testing.assert_close(align_spatial(x, (2, 2)), expected)


# bilinear, align_corners=False, 2 -> 4: output o samples input (o + 0.5) / 2 - 0.5, clamped
UPSAMPLE_2_TO_4 = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
# 8 -> 4 samples (o + 0.5) * 2 - 0.5 = 2o + 0.5: the mean of inputs 2o and 2o + 1
DOWNSAMPLE_8_TO_4 = torch.repeat_interleave(torch.eye(4), 2, dim=1) / 2


def test_align_spatial_up_is_bilinear_interpolation():
    x = randn(2, 3, 2, 2, seed=12)
    expected = UPSAMPLE_2_TO_4 @ x @ UPSAMPLE_2_TO_4.T  # separable: rows, then columns
    torch.testing.assert_close(align_spatial(x, (4, 4)), expected)


def test_align_spatial_mixed_larger_and_smaller_is_bilinear():
    x = randn(1, 2, 8, 2, seed=13)
    expected = DOWNSAMPLE_8_TO_4 @ x @ UPSAMPLE_2_TO_4.T
    torch.testing.assert_close(align_spatial(x, (4, 4)), expected)


@pytest.mark.parametrize("student_size", [(8, 8), (2, 2)])
def test_align_spatial_commutes_with_a_1x1_projector(student_size):
    torch.manual_seed(0)
    projector = make_projector((2, 4, *student_size), (2, 6, 4, 4))
    x = randn(2, 4, *student_size, seed=14)
    torch.testing.assert_close(
        projector(align_spatial(x, (4, 4))), align_spatial(projector(x), (4, 4))
    )


def test_align_spatial_passes_gradients_to_the_student():
    for size in [(2, 2), (8, 8)]:
        x = randn(1, 2, 4, 4, seed=15).requires_grad_()
        align_spatial(x, size).sum().backward()
        assert x.grad is not None and x.grad.abs().min() > 0


def test_align_spatial_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        align_spatial(torch.zeros(2, 3, 4), (2, 2))
    with pytest.raises(ValueError, match="teacher_size"):
        align_spatial(torch.zeros(2, 3, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="teacher_size"):
        align_spatial(torch.zeros(2, 3, 4, 4), (0, 2))


# ---------------------------------------------------------------- attention transfer


def reference_attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float):
    """Per sample: Q = sum_c |A_c|^p, q = Q / ||Q||_2; mean over samples and positions of (q_s - q_t)^2."""
    n = student.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        q = []
        for a in (student[i].double(), teacher[i].double()):
            attention = sum(a[c].abs() ** p for c in range(a.shape[0])).flatten()
            q.append(attention / attention.pow(2).sum().sqrt())
        total += ((q[0] - q[1]) ** 2).sum()
    positions = student[0, 0].numel()
    return (total / (n * positions)).float()


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_transfer_matches_reference_with_different_channels(p):
    student, teacher = randn(3, 4, 5, 6, seed=16), randn(3, 9, 5, 6, seed=17)
    torch.testing.assert_close(
        attention_transfer_loss(student, teacher, p),
        reference_attention_transfer(student, teacher, p),
    )


def test_attention_transfer_hand_computed_value():
    # all energy at one position each: q_s = e_a, q_t = e_b, ||q_s - q_t||^2 = 2 per sample
    student, teacher = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4)
    student[:, 1, 0, 0] = 3.0
    teacher[:, 2, 3, 1] = -0.5
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(2 / 16)


def test_attention_transfer_identical_maps_give_zero():
    x = randn(2, 4, 3, 3, seed=18)
    assert attention_transfer_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_transfer_invariant_to_positive_scaling_of_a_map():
    student, teacher = randn(2, 4, 5, 5, seed=19), randn(2, 6, 5, 5, seed=20)
    loss = attention_transfer_loss(student, teacher)
    torch.testing.assert_close(attention_transfer_loss(7.5 * student, teacher), loss)
    torch.testing.assert_close(attention_transfer_loss(student, 0.01 * teacher), loss)
    # and to the sign, since |A|^p
    torch.testing.assert_close(attention_transfer_loss(-student, teacher), loss)


def test_attention_transfer_of_an_all_zero_map_is_finite():
    student = torch.zeros(2, 3, 4, 4, requires_grad=True)  # dead ReLUs
    loss = attention_transfer_loss(student, randn(2, 5, 4, 4, seed=21))
    loss.backward()
    # q_s = 0: the loss is ||q_t||^2 = 1 per sample, over 16 positions
    assert loss.item() == pytest.approx(1 / 16)
    assert torch.isfinite(student.grad).all()


def test_attention_transfer_after_align_spatial():
    student, teacher = randn(2, 4, 8, 8, seed=22), randn(2, 6, 4, 4, seed=23)
    with pytest.raises(ValueError, match="align_spatial"):
        attention_transfer_loss(student, teacher)
    aligned = align_spatial(student, teacher.shape[-2:])
    torch.testing.assert_close(
        attention_transfer_loss(aligned, teacher),
        reference_attention_transfer(aligned, teacher, 2.0),
    )


def test_attention_transfer_bad_input_raises():
    with pytest.raises(ValueError, match="batch and spatial"):
        attention_transfer_loss(torch.ones(3, 2, 4, 4), torch.ones(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        attention_transfer_loss(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="p must be"):
        attention_transfer_loss(torch.ones(2, 2, 4, 4), torch.ones(2, 2, 4, 4), p=0.0)


# ---------------------------------------------------------------- hidden states


def reference_hidden_state(student, teacher, kind, mask):
    """Mean over valid tokens of mean_d (s - t)^2 ("mse") or 1 - <s, t> / (|s| |t|) ("cosine")."""
    per_token = []
    for i in range(student.shape[0]):
        for j in range(student.shape[1]):
            if not mask[i, j]:
                continue
            s, t = student[i, j].double(), teacher[i, j].double()
            if kind == "mse":
                per_token.append(((s - t) ** 2).mean())
            else:
                per_token.append(
                    1 - (s * t).sum() / (s.pow(2).sum().sqrt() * t.pow(2).sum().sqrt())
                )
    return torch.stack(per_token).mean().float()


MASK = torch.tensor([[True, True, True, False, False], [True, False, True, True, True]])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_reference(kind):
    student, teacher = randn(2, 5, 8, seed=24), randn(2, 5, 8, seed=25)
    torch.testing.assert_close(
        hidden_state_loss(student, teacher, kind, MASK),
        reference_hidden_state(student, teacher, kind, MASK),
    )
    all_valid = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(
        hidden_state_loss(student, teacher, kind),
        reference_hidden_state(student, teacher, kind, all_valid),
    )


def test_hidden_state_mse_without_mask_is_element_mse():
    student, teacher = randn(2, 5, 8, seed=26), randn(2, 5, 8, seed=27)
    torch.testing.assert_close(
        hidden_state_loss(student, teacher, "mse"), hint_loss(student, teacher)
    )


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_identical_gives_zero(kind):
    x = randn(2, 5, 8, seed=28)
    assert hidden_state_loss(x, x.clone(), kind, MASK).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_state_cosine_invariant_to_scaling_and_bounded():
    student, teacher = randn(2, 5, 8, seed=29), randn(2, 5, 8, seed=30)
    loss = hidden_state_loss(student, teacher, "cosine", MASK)
    torch.testing.assert_close(hidden_state_loss(3 * student, 0.2 * teacher, "cosine", MASK), loss)
    assert hidden_state_loss(student, 3 * student, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(student, -student, "cosine").item() == pytest.approx(2.0)
    # mse is not scale invariant
    assert hidden_state_loss(student, 3 * student, "mse").item() > 0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_masked_tokens_contribute_nothing(kind):
    student = randn(2, 5, 8, seed=31).requires_grad_()
    teacher = randn(2, 5, 8, seed=32)
    loss = hidden_state_loss(student, teacher, kind, MASK)
    loss.backward()
    assert torch.all(student.grad[~MASK] == 0)
    assert torch.all(student.grad[MASK].abs().sum(dim=-1) > 0)
    changed_teacher = teacher.clone()
    changed_teacher[~MASK] = 100 * randn(int((~MASK).sum()), 8, seed=33)
    torch.testing.assert_close(hidden_state_loss(student, changed_teacher, kind, MASK), loss)


def test_hidden_state_all_false_mask_gives_zero():
    student = randn(2, 5, 8, seed=34).requires_grad_()
    loss = hidden_state_loss(student, randn(2, 5, 8), "cosine", torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


def test_hidden_state_bad_input_raises():
    x = randn(2, 5, 8)
    with pytest.raises(ValueError, match="make_projector"):
        hidden_state_loss(x, randn(2, 5, 12))
    with pytest.raises(ValueError, match="same tokens"):
        hidden_state_loss(x, randn(2, 6, 8))
    with pytest.raises(ValueError, match="kind"):
        hidden_state_loss(x, x, kind="l1")
    with pytest.raises(ValueError, match="mask"):
        hidden_state_loss(x, x, mask=torch.ones(2, 8, dtype=torch.bool))


# ---------------------------------------------------------------- attention maps


def reference_attention_kl(student, teacher, mask):
    """Mean over heads and valid query rows of sum_k t_k log(t_k / s_k), with 0 log 0 = 0."""
    n, heads, length, _ = student.shape
    rows = []
    for i in range(n):
        for h in range(heads):
            for q in range(length):
                if not mask[i, q]:
                    continue
                kl = torch.zeros((), dtype=torch.float64)
                for k in range(length):
                    t, s = teacher[i, h, q, k].double(), student[i, h, q, k].double()
                    if t > 0:
                        kl += t * (t.log() - s.log())
                rows.append(kl)
    return torch.stack(rows).mean().float()


def test_attention_map_kl_matches_reference_with_padding():
    valid_lengths = [5, 3]
    mask = torch.arange(5)[None, :] < torch.tensor(valid_lengths)[:, None]
    student = attention_probs(2, 3, 5, seed=35, valid_lengths=valid_lengths)
    teacher = attention_probs(2, 3, 5, seed=36, valid_lengths=valid_lengths)
    loss = attention_map_kl(student, teacher, mask)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference_attention_kl(student, teacher, mask))


def test_attention_map_kl_without_mask_averages_every_row():
    student, teacher = attention_probs(2, 2, 4, seed=37), attention_probs(2, 2, 4, seed=38)
    torch.testing.assert_close(
        attention_map_kl(student, teacher),
        reference_attention_kl(student, teacher, torch.ones(2, 4, dtype=torch.bool)),
    )
    # the per-row KL is F.kl_div's, averaged over N * heads * L rows
    expected = F.kl_div(student.log(), teacher, reduction="sum") / (2 * 2 * 4)
    torch.testing.assert_close(attention_map_kl(student, teacher), expected)


def test_attention_map_kl_identical_gives_zero():
    attn = attention_probs(2, 3, 4, seed=39, valid_lengths=[4, 2])
    assert attention_map_kl(attn, attn.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_map_kl_padding_rows_contribute_nothing():
    mask = torch.tensor([[True, True, False, False]])
    student = attention_probs(1, 2, 4, seed=40).requires_grad_()
    teacher = attention_probs(1, 2, 4, seed=41)
    loss = attention_map_kl(student, teacher, mask)
    loss.backward()
    assert torch.all(student.grad[0, :, 2:] == 0)
    changed_teacher = teacher.clone()
    changed_teacher[0, :, 2:] = attention_probs(1, 2, 4, seed=42)[0, :, 2:]
    torch.testing.assert_close(
        attention_map_kl(student.detach(), changed_teacher, mask), loss.detach()
    )


def test_attention_map_kl_underflowed_student_probability_stays_finite():
    teacher = torch.full((1, 1, 2, 2), 0.5)
    student = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]], requires_grad=True)
    loss = attention_map_kl(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10  # large, not inf
    assert torch.isfinite(student.grad).all()


def test_attention_map_kl_half_precision_computed_in_fp32():
    student, teacher = attention_probs(2, 2, 6, seed=43), attention_probs(2, 2, 6, seed=44)
    loss = attention_map_kl(student.half(), teacher.half())
    assert loss.dtype == torch.float32
    mask = torch.ones(2, 6, dtype=torch.bool)
    expected = reference_attention_kl(student.half().float(), teacher.half().float(), mask)
    torch.testing.assert_close(loss, expected)


def test_attention_map_kl_bad_input_raises():
    attn = attention_probs(2, 4, 5, seed=45)
    with pytest.raises(ValueError, match="heads"):
        attention_map_kl(attention_probs(2, 2, 5, seed=46), attn)
    with pytest.raises(ValueError, match="same tokens"):
        attention_map_kl(attention_probs(2, 4, 6, seed=47), attn)
    with pytest.raises(ValueError, match=r"\(N, heads, L, L\)"):
        attention_map_kl(attn[..., :3], attn)
    with pytest.raises(ValueError, match="mask"):
        attention_map_kl(attn, attn, mask=torch.ones(2, 4, dtype=torch.bool))


def test_attention_map_kl_heads_can_be_averaged_explicitly():
    # the documented fallback for different head counts: mean over heads keeps rows distributions
    student, teacher = attention_probs(2, 2, 5, seed=48), attention_probs(2, 6, 5, seed=49)
    mean_s, mean_t = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    torch.testing.assert_close(mean_t.sum(dim=-1), torch.ones(2, 1, 5))
    torch.testing.assert_close(
        attention_map_kl(mean_s, mean_t),
        reference_attention_kl(mean_s, mean_t, torch.ones(2, 5, dtype=torch.bool)),
    )


# ---------------------------------------------------------------- uniform_layer_map


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "teacher_indices"),
    [
        (4, 12, [2, 5, 8, 11]),
        (6, 12, [1, 3, 5, 7, 9, 11]),
        (3, 4, [0, 1, 3]),
        (1, 12, [11]),
        (5, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_uniform_layer_map_examples(student_layers, teacher_layers, teacher_indices):
    assert uniform_layer_map(student_layers, teacher_layers) == list(
        zip(range(student_layers), teacher_indices, strict=True)
    )


def test_uniform_layer_map_is_tinybert_g_for_every_size():
    for teacher_layers in range(1, 25):
        for student_layers in range(1, teacher_layers + 1):
            pairs = uniform_layer_map(student_layers, teacher_layers)
            # TinyBERT g(m) = m * N / M for 1-based m, shifted to 0-based indices
            assert pairs == [
                (m - 1, m * teacher_layers // student_layers - 1)
                for m in range(1, student_layers + 1)
            ]
            teachers = [t for _, t in pairs]
            assert teachers[-1] == teacher_layers - 1
            assert all(a < b for a, b in itertools.pairwise(teachers))


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "match"),
    [
        (0, 12, "num_student_layers"),
        (-2, 12, "num_student_layers"),
        (4, 0, "num_teacher_layers"),
        (4.0, 12, "num_student_layers"),
        (True, 12, "num_student_layers"),
        (13, 12, "explicitly"),
    ],
)
def test_uniform_layer_map_bad_input_raises(student_layers, teacher_layers, match):
    with pytest.raises(ValueError, match=match):
        uniform_layer_map(student_layers, teacher_layers)
