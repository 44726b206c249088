"""Top-k soft targets: the loss against a reference written from its formula, its limits, and the
on-disk encodings (q8 values, Elias-Fano ids) with their reconstruction KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stillroom.losses import soft_target_loss
from stillroom.losses.topk import TopKTargets, topk_soft_target_loss, topk_targets_from_logits
from stillroom.store.codec import (
    LOGPROB_FLOOR,
    EliasFanoLayout,
    TopKCodec,
    decode_logprobs,
    elias_fano_decode,
    elias_fano_encode,
    encode_logprobs,
    index_dtype,
    reconstruction_kl,
    topk_fidelity,
)


def reference_loss(
    student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float
) -> float:
    """The bucketed KL written out position by position, in float64, from full teacher logits."""
    student, teacher = student.double().reshape(-1, student.shape[-1]), teacher.double()
    teacher = teacher.reshape(-1, teacher.shape[-1])
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        p = torch.softmax(t, 0)
        top = torch.topk(t, k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        # teacher: p_i ** (1/T) on the top k, tail ** (1/T) for the rest bucket, renormalised
        weights = torch.cat(
            [p[top] ** (1 / temperature), p[rest].sum().reshape(1) ** (1 / temperature)]
        )
        p_t = weights / weights.sum()
        q = torch.softmax(s / temperature, 0)
        q_t = torch.cat([q[top], q[rest].sum().reshape(1)])
        kl = sum(
            a * math.log(a / b) for a, b in zip(p_t.tolist(), q_t.tolist(), strict=True) if a > 0
        )
        total += kl
    return total / len(student) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_loss_matches_the_formula(k: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(k)
    student, teacher = (
        torch.randn(3, 5, 11, generator=gen),
        2 * torch.randn(3, 5, 11, generator=gen),
    )
    targets = topk_targets_from_logits(teacher, k, class_dim=-1)
    loss = topk_soft_target_loss(student, targets, temperature)
    assert loss.item() == pytest.approx(reference_loss(student, teacher, k, temperature), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_k_equal_to_vocab_is_the_full_soft_target_loss(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 6, 9, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    targets = topk_targets_from_logits(teacher, 9, class_dim=-1)
    assert targets.tail_mass.abs().max() < 1e-6
    loss = topk_soft_target_loss(student, targets, temperature, mask=mask)
    full = soft_target_loss(student, teacher, temperature, mask=mask, class_dim=-1)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_classes_on_dim_1_for_images_and_classification() -> None:
    gen = torch.Generator().manual_seed(1)
    student, teacher = (
        torch.randn(2, 5, 3, 4, generator=gen),
        torch.randn(2, 5, 3, 4, generator=gen),
    )
    targets = topk_targets_from_logits(teacher, 5, class_dim=1)
    assert targets.indices.shape == (2, 5, 3, 4) and targets.tail_mass.shape == (2, 3, 4)
    full = soft_target_loss(student, teacher, 3.0, class_dim=1)
    torch.testing.assert_close(topk_soft_target_loss(student, targets, 3.0, class_dim=1), full)
    flat_s, flat_t = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    two = topk_targets_from_logits(flat_t, 2, class_dim=1)
    assert topk_soft_target_loss(flat_s, two, 2.0, class_dim=1) == pytest.approx(
        reference_loss(flat_s, flat_t, 2, 2.0), rel=1e-5
    )


def test_mask_drops_positions() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    targets = topk_targets_from_logits(teacher, 3)
    loss = topk_soft_target_loss(student, targets, 2.0, mask=mask)
    kept = topk_soft_target_loss(
        student[mask].unsqueeze(0),
        TopKTargets(
            targets.logprobs[mask].unsqueeze(0),
            targets.indices[mask].unsqueeze(0),
            targets.tail_mass[mask].unsqueeze(0),
        ),
        2.0,
    )
    torch.testing.assert_close(loss, kept)
    garbage = student.clone()
    garbage[~mask] = 1e4  # what masked positions hold must not matter
    torch.testing.assert_close(topk_soft_target_loss(garbage, targets, 2.0, mask=mask), loss)
    none = topk_soft_target_loss(student, targets, 2.0, mask=torch.zeros(2, 4, dtype=torch.bool))
    assert none.item() == 0.0


def test_identical_distributions_give_zero_at_t1_and_gradients_stay_finite() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 30, generator=gen)
    logits[:, 0] = float("-inf")  # a class the teacher rules out
    student = logits.clone().nan_to_num(neginf=-50.0).requires_grad_(True)
    targets = topk_targets_from_logits(logits, 4)
    assert topk_soft_target_loss(student, targets, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    topk_soft_target_loss(student, targets, 3.0).backward()
    assert torch.isfinite(student.grad).all()


def test_tail_mass_keeps_precision_when_tiny() -> None:
    logits = torch.tensor([[40.0, 0.0, 0.0, 0.0]])
    targets = topk_targets_from_logits(logits, 1)
    expected = 3 * math.exp(-40.0) / (1 + 3 * math.exp(-40.0))
    assert targets.tail_mass.item() == pytest.approx(expected, rel=1e-4)  # 1 - sum would give 0


def test_bad_shapes_and_temperature_raise() -> None:
    student = torch.randn(2, 10)
    targets = topk_targets_from_logits(torch.randn(2, 10), 3, class_dim=1)
    with pytest.raises(ValueError, match="do not fit student logits"):
        topk_soft_target_loss(torch.randn(3, 10), targets, 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        topk_soft_target_loss(student, targets, 0.0)
    with pytest.raises(ValueError, match="k must be in"):
        topk_targets_from_logits(student, 11)


@pytest.mark.parametrize(
    ("universe", "k"), [(49_152, 128), (49_152, 8), (10, 10), (10, 3), (70_000, 32), (1, 1)]
)
def test_elias_fano_round_trip(universe: int, k: int) -> None:
    rng = np.random.default_rng(universe + k)
    ids = np.sort(np.stack([rng.choice(universe, k, replace=False) for _ in range(40)]), axis=1)
    ids[0] = np.arange(universe - k, universe)  # the largest ids
    layout = EliasFanoLayout(universe, k)
    packed = elias_fano_encode(ids, layout)
    assert packed.shape == (40, layout.num_bytes) and packed.dtype == np.uint8
    np.testing.assert_array_equal(elias_fano_decode(packed, layout), ids)
    # within Elias-Fano's bound of 2 + ceil(log2(U / k)) bits per id
    assert layout.num_bytes * 8 <= k * (2 + math.ceil(math.log2(max(universe / k, 1)))) + 16


def test_narrowest_index_dtype() -> None:
    assert index_dtype(10) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16 and index_dtype(49_152) == np.uint16
    assert index_dtype(65_537) == np.int32


def test_q8_values_stay_within_half_a_step() -> None:
    logprobs = np.array([0.0, -0.01, -1.5, -7.3, -19.99, -25.0, -np.inf], dtype=np.float32)
    decoded = decode_logprobs(encode_logprobs(logprobs, "q8"), "q8")
    step = -LOGPROB_FLOOR / 254
    np.testing.assert_allclose(decoded[:5], logprobs[:5], atol=step / 2 + 1e-6)
    assert decoded[5] == pytest.approx(LOGPROB_FLOOR) and decoded[6] == -np.inf


@pytest.mark.parametrize(("values", "indices"), [("fp16", "plain"), ("q8", "elias-fano")])
def test_codec_round_trip_keeps_the_top_k(values: str, indices: str) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(64, 300, generator=gen)
    codec = TopKCodec(300, 16, values, indices)
    targets = topk_targets_from_logits(logits, 16)
    stored = codec.encode(
        targets.logprobs.numpy(), targets.indices.numpy(), targets.tail_mass.numpy()
    )
    assert sum(a[0].nbytes for a in stored.values()) == codec.bytes_per_position
    logprobs, ids, tail = codec.decode(stored)
    order = np.argsort(targets.indices.numpy(), axis=1)
    np.testing.assert_array_equal(
        np.sort(ids, axis=1), np.take_along_axis(targets.indices.numpy(), order, 1)
    )
    by_id = dict(zip(ids[0].tolist(), logprobs[0].tolist(), strict=True))
    for i, lp in zip(targets.indices[0].tolist(), targets.logprobs[0].tolist(), strict=True):
        assert by_id[i] == pytest.approx(lp, abs=0.05 if values == "q8" else 2e-3)
    np.testing.assert_allclose(tail, targets.tail_mass.numpy(), rtol=5e-3)


def test_reconstruction_kl_matches_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(6, 50, generator=gen)
    codec = TopKCodec(50, 5, "fp32", "plain")
    kl, _ = reconstruction_kl(logits, codec)
    for row, value in zip(logits.double(), kl, strict=True):
        p = torch.softmax(row, 0)
        top = torch.topk(row, 5).indices
        q = torch.full_like(p, (1 - p[top].sum().item()) / 45)
        q[top] = p[top]
        assert value.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-4, abs=1e-9)


def test_fidelity_improves_with_k_and_is_exact_at_full_vocab() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(2, 16, 100, generator=gen)
    rows = topk_fidelity(logits, [4, 16, 64, 100], class_dim=-1, values="fp32")
    kls = [r["kl_mean"] for r in rows]
    assert kls == sorted(kls, reverse=True)
    assert kls[-1] < 1e-6 and rows[-1]["tail_mass_mean"] < 1e-6
    assert [r["bytes_per_position"] for r in rows] == [
        4 * 5 + 4,
        16 * 5 + 4,
        64 * 5 + 4,
        100 * 5 + 4,
    ]
    quantised = topk_fidelity(logits, [16], values="q8", indices="elias-fano")[0]
    assert quantised["bytes_per_position"] < rows[1]["bytes_per_position"] / 2
    assert quantised["kl_mean"] < rows[1]["kl_mean"] + 1e-3
