"""Decoupled KD (Zhao et al. 2022) against the paper's formulas and its decomposition identity."""

import math

import pytest
import torch
import torch.nn.functional as F

from stillroom.losses.dkd import decoupled_kd_loss
from stillroom.losses.logits import IGNORE_INDEX, soft_target_loss


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kl(p: list[float] | torch.Tensor, q: list[float] | torch.Tensor) -> torch.Tensor:
    """sum_k p_k log(p_k / q_k), with 0 log 0 = 0."""
    return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q, strict=True) if pk > 0)


def reference_parts(student, teacher, label, temperature):
    """(TCKD, NCKD, teacher's p_t) for one sample (C,), from the paper's definitions."""
    p_s = torch.softmax(student.double() / temperature, dim=0).tolist()
    p_t = torch.softmax(teacher.double() / temperature, dim=0).tolist()
    others = [k for k in range(len(p_s)) if k != label]
    # 1 - p_t as the sum of the other classes: the same number, without cancellation for p_t ~ 1
    rest_s, rest_t = sum(p_s[k] for k in others), sum(p_t[k] for k in others)
    b_s, b_t = [p_s[label], rest_s], [p_t[label], rest_t]
    hat_s = [p_s[k] / rest_s for k in others]
    hat_t = [p_t[k] / rest_t for k in others]
    return kl(b_t, b_s), kl(hat_t, hat_s), p_t[label]


def reference_dkd(student, teacher, labels, alpha, beta, temperature):
    """T^2 * mean over labelled samples of alpha * TCKD + beta * NCKD."""
    per_sample = []
    for i, label in enumerate(labels.tolist()):
        if label == IGNORE_INDEX:
            continue
        tckd, nckd, _ = reference_parts(student[i], teacher[i], label, temperature)
        per_sample.append(alpha * tckd + beta * nckd)
    return torch.tensor(temperature**2 * sum(per_sample) / len(per_sample), dtype=torch.float32)


LABELS = torch.tensor([0, 3, 3, 1, 4, 2])


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.5)]
)
def test_dkd_matches_reference(alpha, beta, temperature):
    student, teacher = randn(6, 5, seed=1), 2 * randn(6, 5, seed=2)
    torch.testing.assert_close(
        decoupled_kd_loss(student, teacher, LABELS, alpha, beta, temperature),
        reference_dkd(student, teacher, LABELS, alpha, beta, temperature),
    )


def test_dkd_identical_logits_give_zero():
    x = randn(6, 5, seed=3)
    assert decoupled_kd_loss(x, x.clone(), LABELS).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposes_classic_kd_per_sample(temperature):
    # Zhao et al. eq. 4: KL(p^T || p^S) = TCKD + (1 - p^T_t) * NCKD, every term without T^2
    student, teacher = randn(6, 5, seed=4), 3 * randn(6, 5, seed=5)
    t2 = temperature**2
    for i, label in enumerate(LABELS.tolist()):
        s_i, t_i, y_i = student[i : i + 1], teacher[i : i + 1], LABELS[i : i + 1]
        classic = soft_target_loss(s_i, t_i, temperature) / t2
        tckd = decoupled_kd_loss(s_i, t_i, y_i, alpha=1.0, beta=0.0, temperature=temperature) / t2
        nckd = decoupled_kd_loss(s_i, t_i, y_i, alpha=0.0, beta=1.0, temperature=temperature) / t2
        p_target = torch.softmax(t_i[0] / temperature, dim=0)[label]
        torch.testing.assert_close(tckd + (1 - p_target) * nckd, classic)


def test_dkd_with_teacher_confidence_as_beta_is_classic_kd():
    # one sample: alpha = 1, beta = 1 - p^T_t gives back the T^2-scaled KD loss exactly
    student, teacher, label = randn(1, 7, seed=6), randn(1, 7, seed=7), torch.tensor([2])
    p_target = torch.softmax(teacher[0] / 3.0, dim=0)[2].item()
    torch.testing.assert_close(
        decoupled_kd_loss(student, teacher, label, 1.0, 1 - p_target, 3.0),
        soft_target_loss(student, teacher, 3.0),
    )


def test_dkd_is_linear_in_alpha_and_beta():
    student, teacher = randn(6, 5, seed=8), randn(6, 5, seed=9)
    tckd = decoupled_kd_loss(student, teacher, LABELS, alpha=1.0, beta=0.0)
    nckd = decoupled_kd_loss(student, teacher, LABELS, alpha=0.0, beta=1.0)
    torch.testing.assert_close(
        decoupled_kd_loss(student, teacher, LABELS, alpha=0.7, beta=5.0), 0.7 * tckd + 5.0 * nckd
    )


def test_dkd_two_classes_has_no_non_target_part():
    # with one non-target class its renormalised distribution is always (1,): NCKD = 0
    student, teacher, labels = (
        randn(4, 2, seed=10),
        randn(4, 2, seed=11),
        torch.tensor([0, 1, 1, 0]),
    )
    assert decoupled_kd_loss(student, teacher, labels, alpha=0.0, beta=1.0).item() == 0.0
    # and TCKD is then the whole KL
    torch.testing.assert_close(
        decoupled_kd_loss(student, teacher, labels, alpha=1.0, beta=0.0, temperature=2.0),
        soft_target_loss(student, teacher, 2.0),
    )


def test_dkd_matches_the_authors_formulation():
    # the authors' code: probabilities of (target, rest) summed from the softmax, and the target
    # logit pushed down by 1000 instead of masked; the same for moderate logits
    student, teacher, temperature = randn(6, 5, seed=12), randn(6, 5, seed=13), 4.0
    gt = F.one_hot(LABELS, 5).bool()
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = F.kl_div(b_s.log(), b_t, reduction="sum") * temperature**2 / 6
    log_hat_s = F.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    hat_t = F.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_hat_s, hat_t, reduction="sum") * temperature**2 / 6
    torch.testing.assert_close(
        decoupled_kd_loss(student, teacher, LABELS, 1.0, 8.0, temperature), tckd + 8.0 * nckd
    )


def test_dkd_confident_teacher_stays_finite_and_accurate():
    # p_t rounds to 1 in fp32 for both models: the non-target mass has to come from the other
    # classes (1 - p_t would be 0 and its log -inf)
    teacher = torch.tensor([[60.0, 0.0, -3.0, 1.0], [0.0, 45.0, 2.0, -1.0]])
    student = torch.tensor([[30.0, 1.0, 0.0, -2.0], [0.5, 25.0, -1.0, 0.0]]).requires_grad_()
    labels = torch.tensor([0, 1])
    loss = decoupled_kd_loss(student, teacher, labels, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(
        loss.detach(), reference_dkd(student.detach(), teacher, labels, 1.0, 8.0, 1.0)
    )


# ---------------------------------------------------------------- unlabelled samples


def test_dkd_ignored_samples_contribute_nothing():
    student = randn(6, 5, seed=15).requires_grad_()
    teacher = randn(6, 5, seed=16)
    labels = torch.tensor([0, IGNORE_INDEX, 3, IGNORE_INDEX, 4, 2])
    labelled = labels != IGNORE_INDEX
    loss = decoupled_kd_loss(student, teacher, labels)
    # the mean is over the labelled samples only
    torch.testing.assert_close(
        loss.detach(),
        decoupled_kd_loss(student.detach()[labelled], teacher[labelled], labels[labelled]),
    )
    torch.testing.assert_close(
        loss.detach(), reference_dkd(student.detach(), teacher, labels, 1.0, 8.0, 4.0)
    )
    loss.backward()
    assert torch.all(student.grad[~labelled] == 0)
    assert torch.all(student.grad[labelled].abs().sum(dim=1) > 0)


def test_dkd_all_ignored_gives_zero_with_a_grad_path():
    student = randn(3, 5, seed=17).requires_grad_()
    loss = decoupled_kd_loss(student, randn(3, 5, seed=18), torch.full((3,), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(student.grad == 0)


# ---------------------------------------------------------------- precision and bad input


def test_dkd_half_precision_computed_in_fp32():
    student, teacher = (4 * randn(6, 50, seed=19)).half(), (4 * randn(6, 50, seed=20)).half()
    labels = torch.tensor([0, 10, 20, 30, 40, 49])
    loss = decoupled_kd_loss(student, teacher, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, reference_dkd(student.float(), teacher.float(), labels, 1.0, 8.0, 4.0)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"student": (4, 5), "teacher": (4, 6)}, r"\(N, C\)"),
        ({"student": (4, 5, 2), "teacher": (4, 5, 2)}, r"\(N, C\)"),
        ({"student": (4, 1), "teacher": (4, 1), "labels": [0, 0, 0, 0]}, "at least 2 classes"),
        ({"labels": [0, 1, 5, 2]}, r"\[0, 5\)"),
        ({"labels": [0, -3, 1, 2]}, "IGNORE_INDEX"),
        ({"labels": [0, 1]}, "shape"),
        ({"labels": [0.0, 1.0, 2.0, 3.0]}, "integer"),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": -1.0}, "alpha and beta"),
        ({"beta": float("nan")}, "alpha and beta"),
    ],
)
def test_dkd_bad_input_raises(kwargs, match):
    student = randn(*kwargs.pop("student", (4, 5)))
    teacher = randn(*kwargs.pop("teacher", (4, 5)))
    labels = torch.tensor(kwargs.pop("labels", [0, 1, 2, 3]))
    with pytest.raises(ValueError, match=match):
        decoupled_kd_loss(student, teacher, labels, **kwargs)
