"""The ranking distillation losses against hand references and their limiting cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stillroom.losses.ranking import (
    hard_label_ranking_loss,
    listwise_distillation_loss,
    pointwise_soft_label_loss,
    ranking_distillation_loss,
    ranking_weights,
    relaxed_ranking_loss,
)


def _scores(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_hard_label_loss_is_bce_by_hand() -> None:
    s = torch.tensor([[2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0]])
    by_hand = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert hard_label_ranking_loss(s, labels).item() == pytest.approx(by_hand, rel=1e-6)


def test_pointwise_with_certain_teacher_is_the_hard_label_bce() -> None:
    s = _scores(4, 6)
    labels = (torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    teacher = (labels * 2 - 1) * 100.0  # sigmoid -> exactly 0 / 1
    assert pointwise_soft_label_loss(s, teacher).item() == pytest.approx(
        hard_label_ranking_loss(s, labels).item(), rel=1e-5
    )


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_pointwise_gradient_vanishes_at_identical_scores(temperature: float) -> None:
    s = _scores(3, 5).requires_grad_()
    pointwise_soft_label_loss(s, s.detach().clone(), temperature).backward()
    assert s.grad is not None and s.grad.abs().max().item() < 1e-7


def test_pointwise_by_hand_with_temperature() -> None:
    s, t, T = torch.tensor([[0.5]]), torch.tensor([[2.0]]), 2.0
    p = 1 / (1 + math.exp(-t.item() / T))
    q = 1 / (1 + math.exp(-s.item() / T))
    by_hand = -(p * math.log(q) + (1 - p) * math.log(1 - q)) * T**2
    assert pointwise_soft_label_loss(s, t, T).item() == pytest.approx(by_hand, rel=1e-6)


def test_listwise_is_zero_for_identical_or_shifted_scores() -> None:
    s = _scores(4, 7)
    assert listwise_distillation_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert listwise_distillation_loss(s, s + 3.0).item() == pytest.approx(0.0, abs=1e-5)


def test_listwise_is_kl_times_t_squared() -> None:
    s, t, T = _scores(2, 5), _scores(2, 5, seed=3), 2.0
    p = F.softmax(t / T, 1)
    by_hand = (p * (p.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T**2
    assert listwise_distillation_loss(s, t, T).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert listwise_distillation_loss(s, t, T).item() > 0


def test_ranking_weights_decay_and_sum_to_one() -> None:
    w = ranking_weights(4, lam=2.0)
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.all(w[:-1] > w[1:])
    assert (w[0] / w[1]).item() == pytest.approx(math.exp(0.5), rel=1e-6)


def test_ranking_distillation_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0]])
    w = ranking_weights(2, lam=1.0)
    by_hand = -(w[0] * F.logsigmoid(s[0, 0]) + w[1] * F.logsigmoid(s[0, 1]))
    assert ranking_distillation_loss(s, lam=1.0).item() == pytest.approx(by_hand.item())
    # higher scores of the teacher's items lower the loss
    assert ranking_distillation_loss(s + 5).item() < ranking_distillation_loss(s).item()


def test_relaxed_ranking_by_hand_and_order() -> None:
    interesting, rest = torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, -1.0]])
    e = [math.exp(v) for v in (2.0, 1.0, 0.0, -1.0)]
    by_hand = -(math.log(e[0] / sum(e)) + math.log(e[1] / (e[1] + e[2] + e[3])))
    assert relaxed_ranking_loss(interesting, rest).item() == pytest.approx(by_hand, rel=1e-6)
    # the teacher's order kept scores lower than the reverse order
    assert relaxed_ranking_loss(interesting, rest) < relaxed_ranking_loss(interesting.flip(1), rest)
    # the uninteresting items' own order is not asked for
    assert relaxed_ranking_loss(interesting, rest).item() == pytest.approx(
        relaxed_ranking_loss(interesting, rest.flip(1)).item()
    )


def test_relaxed_ranking_is_stable_for_large_scores() -> None:
    loss = relaxed_ranking_loss(torch.tensor([[1000.0, 999.0]]), torch.tensor([[-1000.0]]))
    assert torch.isfinite(loss)
