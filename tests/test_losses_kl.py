"""The shared KL kernel: the reference formula, zeros and -inf in either distribution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stillroom.losses.kl import kl_divergence


def test_kl_is_the_reference_sum_over_the_chosen_dim() -> None:
    gen = torch.Generator().manual_seed(0)
    log_p = F.log_softmax(torch.randn(3, 5, 4, generator=gen), dim=1)
    log_q = F.log_softmax(torch.randn(3, 5, 4, generator=gen), dim=1)
    want = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    torch.testing.assert_close(kl_divergence(log_p, log_q, dim=1), want)
    torch.testing.assert_close(
        kl_divergence(log_p, log_q, dim=1),
        F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1),
    )
    assert torch.equal(kl_divergence(log_p, log_p, dim=1), torch.zeros(3, 4))


def test_classes_outside_the_support_add_zero_with_finite_gradients() -> None:
    # a class both sides rule out: -inf - -inf would be nan; 0 * log 0 = 0 instead
    logits = torch.tensor([[0.0, 1.0, float("-inf")]])
    log_p = F.log_softmax(logits, dim=-1)
    student = torch.tensor([[0.5, 0.2, float("-inf")]], requires_grad=True)
    value = kl_divergence(log_p, F.log_softmax(student, dim=-1))
    value.sum().backward()
    kept = kl_divergence(log_p[:, :2], F.log_softmax(student[:, :2].detach(), dim=-1))
    torch.testing.assert_close(value.detach(), kept)
    assert torch.isfinite(student.grad[:, :2]).all()


def test_given_probabilities_replace_exp_of_log_p() -> None:
    p = torch.tensor([[0.0, 0.25, 0.75]])
    tiny = torch.finfo(torch.float32).tiny
    q = torch.tensor([[0.5, 0.5, 0.0]])
    got = kl_divergence(p.clamp_min(tiny).log(), q.clamp_min(tiny).log(), p=p)
    # p = 0 adds nothing; q = 0 is floored at the smallest normal float, not an infinite loss
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * (math.log(0.75) - math.log(tiny))
    torch.testing.assert_close(got, torch.tensor([want]))
