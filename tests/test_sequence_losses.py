"""Token-level losses for language models: forward/reverse KL and the generalized JSD against
references written from their formulas, their limits, masking, chunking, and top-k."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from stillroom.losses import soft_target_loss
from stillroom.losses.sequence import (
    token_distillation_loss,
    token_divergence,
    topk_token_divergence,
)
from stillroom.losses.topk import TopKTargets, topk_soft_target_loss, topk_targets_from_logits

N, L, V = 2, 7, 11
BETAS = [0.0, 0.5, 1.0]


def logits(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape or (N, L, V), generator=torch.Generator().manual_seed(seed))


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student, teacher (sharper) and a mask with some False tokens, (N, L, V) and (N, L)."""
    mask = torch.rand(N, L, generator=torch.Generator().manual_seed(seed + 100)) > 0.3
    mask[0, 0] = True
    return logits(seed), logits(seed + 1, scale=2.0), mask


def jsd_reference(
    student: torch.Tensor, teacher: torch.Tensor, beta: float, t: float
) -> torch.Tensor:
    """beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q, in float64 probabilities."""
    p = torch.softmax(teacher.double() / t, -1)
    q = torch.softmax(student.double() / t, -1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


# ---------------------------------------------------------------- maths against references


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_beta_0_is_forward_kl_and_soft_target_loss(temperature: float) -> None:
    student, teacher, mask = pair()
    loss = token_distillation_loss(student, teacher, mask, beta=0.0, temperature=temperature)
    full = soft_target_loss(student, teacher, temperature, mask=mask, class_dim=-1)
    torch.testing.assert_close(loss, full)
    p = torch.softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    kl = (p * (p.log() - log_q)).sum(-1)
    expected = kl[mask].mean() * temperature**2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_beta_1_is_reverse_kl(temperature: float) -> None:
    student, teacher, _ = pair(1)
    per_token = token_divergence(student, teacher, beta=1.0, temperature=temperature)
    reverse = kl_divergence(
        Categorical(logits=student.double() / temperature),
        Categorical(logits=teacher.double() / temperature),
    )
    assert per_token.shape == (N, L) and per_token.dtype == torch.float32
    torch.testing.assert_close(per_token.double(), reverse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_interior_beta_is_the_generalized_jsd(beta: float) -> None:
    student, teacher, _ = pair(2)
    per_token = token_divergence(student, teacher, beta=beta, temperature=1.5)
    reference = jsd_reference(student, teacher, beta, 1.5)
    torch.testing.assert_close(per_token.double(), reference, rtol=1e-5, atol=1e-6)
    if beta == 0.5:  # the textbook JSD: mean of the KLs to the midpoint
        p, q = torch.softmax(teacher.double() / 1.5, -1), torch.softmax(student.double() / 1.5, -1)
        mid = (p + q) / 2
        textbook = 0.5 * (p * (p / mid).log()).sum(-1) + 0.5 * (q * (q / mid).log()).sum(-1)
        torch.testing.assert_close(per_token.double(), textbook, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_identical_logits_give_zero_with_finite_gradients(beta: float) -> None:
    x = logits(3)
    x[..., 0] = float("-inf")  # a token both models rule out (a masked vocabulary entry)
    student = x.clone().requires_grad_(True)
    loss = token_distillation_loss(student, x, beta=beta, temperature=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_jsd_is_symmetric_and_bounded_by_log_2() -> None:
    student, teacher, _ = pair(4)
    forward = token_divergence(student, teacher, beta=0.5)
    torch.testing.assert_close(forward, token_divergence(teacher, student, beta=0.5))
    # disjoint one-hot-like distributions reach the bound
    far = torch.full((1, 1, 4), -1e4)
    far_t = far.clone()
    far[..., 0], far_t[..., 1] = 0.0, 0.0
    extreme = token_divergence(far, far_t, beta=0.5)
    assert extreme.item() == pytest.approx(math.log(2), rel=1e-5)
    assert (forward <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("beta", BETAS)
def test_temperature_squared_scaling(beta: float) -> None:
    student, teacher, mask = pair(5)
    for temperature in (1.0, 2.0, 4.0):
        per_token = token_divergence(student, teacher, beta=beta, temperature=temperature)
        loss = token_distillation_loss(student, teacher, mask, beta=beta, temperature=temperature)
        torch.testing.assert_close(loss, per_token[mask].mean() * temperature**2)


# ---------------------------------------------------------------- masking and chunking


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("beta", BETAS)
def test_mask_excludes_positions(beta: float, chunk_size: int | None) -> None:
    student, teacher, mask = pair(6)
    loss = token_distillation_loss(student, teacher, mask, beta=beta, chunk_size=chunk_size)
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[~mask], garbage_t[~mask] = 1e4, -3e4  # what masked tokens hold must not matter
    again = token_distillation_loss(garbage_s, garbage_t, mask, beta=beta, chunk_size=chunk_size)
    torch.testing.assert_close(again, loss)
    student.requires_grad_(True)
    none = torch.zeros(N, L, dtype=torch.bool)
    empty = token_distillation_loss(student, teacher, none, beta=beta, chunk_size=chunk_size)
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_equals_unchunked_in_value_and_gradient(beta: float) -> None:
    student, teacher, mask = pair(7)

    def run(chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        loss = token_distillation_loss(
            s, t, mask, beta=beta, temperature=2.0, chunk_size=chunk_size
        )
        loss.backward()
        return loss, s.grad, t.grad

    expected = run(None)
    for chunk_size in (1, 2, 3, 7, 50):  # 3 does not divide L = 7; 50 is larger than L
        for got, want in zip(run(chunk_size), expected, strict=True):
            torch.testing.assert_close(got, want)
    unmasked = token_distillation_loss(student, teacher, beta=beta, chunk_size=4)
    torch.testing.assert_close(unmasked, token_distillation_loss(student, teacher, beta=beta))


def test_chunking_keeps_no_fp32_logit_sized_tensor_for_backward() -> None:
    student = logits(8, N, 12, 50).bfloat16().requires_grad_(True)
    teacher = logits(9, N, 12, 50).bfloat16()

    def saved_by(chunk_size: int | None) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            token_distillation_loss(student, teacher, beta=0.5, chunk_size=chunk_size)
        return saved

    whole = [x for x in saved_by(None) if x.dtype == torch.float32]
    assert sum(x.numel() for x in whole) >= 4 * student.numel()  # the unchunked loss keeps them
    chunked = saved_by(4)
    assert max(x.numel() for x in chunked) <= N * 4 * 50
    assert not any(x.dtype == torch.float32 and x.numel() >= 50 for x in chunked)


@pytest.mark.parametrize("beta", BETAS)
def test_half_precision_inputs_give_a_close_fp32_result(beta: float) -> None:
    student, teacher, mask = pair(10)
    full = token_distillation_loss(student, teacher, mask, beta=beta, temperature=2.0)
    for dtype in (torch.bfloat16, torch.float16):
        half = token_distillation_loss(
            student.to(dtype), teacher.to(dtype), mask, beta=beta, temperature=2.0, chunk_size=3
        )
        assert half.dtype == torch.float32 and torch.isfinite(half)
        assert half.item() == pytest.approx(full.item(), rel=0.05, abs=1e-3)


# ---------------------------------------------------------------- top-k teachers


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_k_equal_to_vocab_is_the_dense_loss(beta: float, temperature: float) -> None:
    student, teacher, mask = pair(11)
    targets = topk_targets_from_logits(teacher, V)
    kw = {"beta": beta, "temperature": temperature}
    dense = token_distillation_loss(student, teacher, mask, **kw)
    torch.testing.assert_close(token_distillation_loss(student, targets, mask, **kw), dense)
    chunked = token_distillation_loss(student, targets, mask, chunk_size=3, **kw)
    torch.testing.assert_close(chunked, dense)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_forward_kl_is_topk_soft_target_loss(temperature: float) -> None:
    student, teacher, mask = pair(12)
    targets = topk_targets_from_logits(teacher, 3)
    loss = token_distillation_loss(student, targets, mask, temperature=temperature)
    expected = topk_soft_target_loss(student, targets, temperature, mask=mask, class_dim=-1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("beta", [0.3, 0.5, 1.0])
def test_topk_divergence_is_the_divergence_of_the_bucketed_distributions(beta: float) -> None:
    student, teacher, _ = pair(13)
    k = 4
    targets = topk_targets_from_logits(teacher, k)
    rest = torch.ones(N, L, V, dtype=torch.bool).scatter(-1, targets.indices, False)

    def buckets(x: torch.Tensor) -> torch.Tensor:  # (N, L, V) probabilities -> (N, L, k + 1)
        probs = torch.softmax(x.double(), -1)
        top = probs.gather(-1, targets.indices)
        return torch.cat([top, (probs * rest).sum(-1, keepdim=True)], -1)

    p, q = buckets(teacher), buckets(student)
    if beta == 1.0:
        expected = (q * (q / p).log()).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        expected = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    got = topk_token_divergence(student, targets, beta=beta)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_chunked_gradients_match(beta: float) -> None:
    student, teacher, mask = pair(14)
    targets = topk_targets_from_logits(teacher, 3)
    grads = []
    for chunk_size in (None, 2):
        s = student.clone().requires_grad_(True)
        loss = token_distillation_loss(
            s, targets, mask, beta=beta, temperature=3.0, chunk_size=chunk_size
        )
        loss.backward()
        grads.append((loss, s.grad))
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.isfinite(grads[0][1]).all()


def test_topk_tail_of_zero_keeps_reverse_kl_finite() -> None:
    student, teacher, _ = pair(15)
    targets = topk_targets_from_logits(teacher, 3)
    underflowed = TopKTargets(
        targets.logprobs, targets.indices, torch.zeros_like(targets.tail_mass)
    )
    loss = token_distillation_loss(student, underflowed, beta=1.0, temperature=2.0)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- user mistakes


def test_bad_inputs_raise_helpful_errors() -> None:
    student, teacher, mask = pair(17)
    with pytest.raises(
        ValueError, match=r"\(2, 7, 11\).*\(2, 7, 12\).*vocab sizes differ.*tokenizer"
    ):
        token_distillation_loss(student, logits(0, N, L, 12))
    with pytest.raises(ValueError, match="same tokens"):
        token_distillation_loss(student, logits(0, N, L + 1, V))
    with pytest.raises(ValueError, match=r"expected \(N, L, V\)"):
        token_divergence(student[0], teacher[0])
    with pytest.raises(ValueError, match=r"mask has shape \(2, 6\).*\(2, 7\)"):
        token_distillation_loss(student, teacher, mask[:, :6])
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
            token_distillation_loss(student, teacher, beta=beta)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_distillation_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        token_distillation_loss(student, teacher, chunk_size=0)
    targets = topk_targets_from_logits(teacher, 3)
    with pytest.raises(ValueError, match="do not fit student logits"):
        token_distillation_loss(student[:, :5], targets)
    with pytest.raises(ValueError, match="only 2 vocabulary entries"):
        token_distillation_loss(student[..., :2], targets)
