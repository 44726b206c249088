"""Maths of the losses against references written from the formulas, and their limiting cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from stillroom.losses import (
    HARD_LABEL_TERMS,
    IGNORE_INDEX,
    blend,
    distillation_loss,
    hard_label_loss,
    hard_target_loss,
    regression_distillation_loss,
    soft_target_loss,
)


def reference_soft_target(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T**2 * mean over rows of sum_c p_t * (log p_t - log p_s), for (M, C) logits."""
    p_teacher = torch.softmax(teacher.double() / temperature, dim=1)
    p_student = torch.softmax(student.double() / temperature, dim=1)
    kl_per_row = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1)
    return (temperature**2 * kl_per_row.mean()).float()


def logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- soft_target_loss


def test_soft_target_hand_computed_value():
    # T=2 halves the logits: sample 0 is student uniform, teacher (1/4, 1/2, 1/4), so
    # KL = 1/2 log(3/4) + 1/2 log(3/2) = 1/2 log(9/8); sample 1 is student (1/2, 1/4, 1/4), teacher
    # uniform, so KL = 1/3 (log(2/3) + 2 log(4/3)) = 1/3 log(32/27). batchmean, then * T**2 = 4.
    log2 = math.log(2.0)
    student = torch.tensor([[0.0, 0.0, 0.0], [2 * log2, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2 * log2, 0.0], [0.0, 0.0, 0.0]])
    expected = 4.0 * (0.5 * math.log(9 / 8) + math.log(32 / 27) / 3) / 2
    assert expected == pytest.approx(0.2311, abs=1e-4)
    loss = soft_target_loss(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_soft_target_identical_logits_give_zero(temperature):
    x = logits(4, 10)
    assert soft_target_loss(x, x.clone(), temperature).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_soft_target_equals_scaled_kl_batchmean(temperature):
    student, teacher = logits(6, 5, seed=1), 3 * logits(6, 5, seed=2)
    loss = soft_target_loss(student, teacher, temperature)
    torch.testing.assert_close(loss, reference_soft_target(student, teacher, temperature))


def test_soft_target_is_batchmean_not_elementwise_mean():
    n, c = 4, 7
    student, teacher = logits(n, c, seed=3), logits(n, c, seed=4)
    p_t = torch.softmax(teacher, dim=1)
    elementwise = p_t * (p_t.log() - torch.log_softmax(student, dim=1))
    loss = soft_target_loss(student, teacher, temperature=1.0)
    torch.testing.assert_close(loss, elementwise.sum() / n)
    # a mean over all N*C elements would be C times smaller
    torch.testing.assert_close(loss / c, elementwise.mean())


def test_soft_target_temperature_squared_keeps_gradient_magnitude():
    def student_grad_norm(temperature: float, scaled: bool) -> float:
        student = (0.5 * logits(8, 10, seed=5)).requires_grad_()
        loss = soft_target_loss(student, 0.5 * logits(8, 10, seed=6), temperature)
        if not scaled:
            loss = loss / temperature**2
        loss.backward()
        return student.grad.norm().item()

    scaled_ratio = student_grad_norm(2.0, scaled=True) / student_grad_norm(8.0, scaled=True)
    unscaled_ratio = student_grad_norm(2.0, scaled=False) / student_grad_norm(8.0, scaled=False)
    assert 0.8 < scaled_ratio < 1.25
    assert unscaled_ratio == pytest.approx(16 * scaled_ratio, rel=1e-4)


def test_soft_target_large_temperature_gradient_limit():
    # for T >> logits, d(T**2 KL)/ds -> (s - t - mean_c(s - t)) / (C * N)
    n, c = 3, 4
    student, teacher = logits(n, c, seed=7).requires_grad_(), logits(n, c, seed=8)
    soft_target_loss(student, teacher, temperature=1000.0).backward()
    diff = (student - teacher).detach()
    expected = (diff - diff.mean(dim=1, keepdim=True)) / (c * n)
    torch.testing.assert_close(student.grad, expected, atol=1e-4, rtol=1e-2)


def test_soft_target_dense_equals_flattened_pixels():
    n, c, h, w = 2, 5, 3, 4
    student, teacher = logits(n, c, h, w, seed=9), logits(n, c, h, w, seed=10)
    flat_student = student.permute(0, 2, 3, 1).reshape(-1, c)  # (N*H*W, C)
    flat_teacher = teacher.permute(0, 2, 3, 1).reshape(-1, c)
    torch.testing.assert_close(
        soft_target_loss(student, teacher, 2.0), soft_target_loss(flat_student, flat_teacher, 2.0)
    )
    torch.testing.assert_close(
        soft_target_loss(student, teacher, 2.0),
        reference_soft_target(flat_student, flat_teacher, 2.0),
    )


def test_soft_target_sequence_with_classes_last():
    n, seq_len, vocab = 2, 6, 11
    student, teacher = logits(n, seq_len, vocab, seed=11), logits(n, seq_len, vocab, seed=12)
    loss = soft_target_loss(student, teacher, 3.0, class_dim=-1)
    expected = reference_soft_target(student.reshape(-1, vocab), teacher.reshape(-1, vocab), 3.0)
    torch.testing.assert_close(loss, expected)


def test_soft_target_mask_averages_over_valid_positions_only():
    n, seq_len, vocab = 2, 5, 7
    student, teacher = logits(n, seq_len, vocab, seed=13), logits(n, seq_len, vocab, seed=14)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    loss = soft_target_loss(student, teacher, 2.0, mask=mask, class_dim=-1)
    torch.testing.assert_close(loss, reference_soft_target(student[mask], teacher[mask], 2.0))


def test_soft_target_masked_positions_contribute_nothing():
    n, seq_len, vocab = 2, 4, 6
    student = logits(n, seq_len, vocab, seed=15).requires_grad_()
    teacher = logits(n, seq_len, vocab, seed=16)
    mask = torch.tensor([[True, True, False, False], [False, True, True, False]])
    loss = soft_target_loss(student, teacher, 2.0, mask=mask, class_dim=-1)
    loss.backward()
    assert torch.all(student.grad[~mask] == 0)
    assert torch.all(student.grad[mask].abs().sum(dim=-1) > 0)

    changed_student, changed_teacher = student.detach().clone(), teacher.clone()
    changed_student[~mask] = 50 * logits(int((~mask).sum()), vocab, seed=17)
    changed_teacher[~mask] = -50 * logits(int((~mask).sum()), vocab, seed=18)
    changed = soft_target_loss(changed_student, changed_teacher, 2.0, mask=mask, class_dim=-1)
    torch.testing.assert_close(changed, loss.detach())


def test_soft_target_all_false_mask_gives_zero_without_nan():
    student = logits(2, 3, 5, seed=19).requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = soft_target_loss(student, logits(2, 3, 5, seed=20), 2.0, mask=mask, class_dim=-1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


def test_soft_target_mask_of_wrong_shape_raises():
    x = logits(2, 3, 5)
    with pytest.raises(ValueError, match="mask"):
        soft_target_loss(x, x, mask=torch.ones(2, 5, dtype=torch.bool), class_dim=-1)


def test_soft_target_teacher_ruling_out_a_class_stays_finite():
    # a -inf teacher logit (masked vocabulary entry) is a zero-probability class: it adds nothing
    teacher = torch.tensor([[1.0, 2.0, float("-inf")], [0.5, float("-inf"), -1.0]])
    assert soft_target_loss(teacher.clone(), teacher, 2.0).item() == 0.0

    student = logits(2, 3, seed=21).requires_grad_()
    loss = soft_target_loss(student, teacher, 2.0)
    loss.backward()
    p_t = torch.softmax(teacher / 2.0, dim=1)
    support = p_t > 0
    log_p_s = torch.log_softmax(student.detach() / 2.0, dim=1)
    expected = 4.0 * (p_t[support] * (p_t[support].log() - log_p_s[support])).sum() / 2
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(student.grad).all()


def test_soft_target_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        soft_target_loss(logits(4, 10), logits(4, 9), 2.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_soft_target_non_positive_temperature_raises(temperature):
    x = logits(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        soft_target_loss(x, x, temperature)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_target_half_precision_computed_in_fp32(dtype):
    student, teacher = (
        (4 * logits(4, 50, seed=22)).to(dtype),
        (4 * logits(4, 50, seed=23)).to(dtype),
    )
    loss = soft_target_loss(student, teacher, 2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference_soft_target(student.float(), teacher.float(), 2.0))


# ---------------------------------------------------------------- regression distillation


def test_regression_distillation_equals_mse():
    student, teacher = logits(5, 3, seed=24), logits(5, 3, seed=25)
    expected = ((student - teacher) ** 2).sum() / student.numel()
    torch.testing.assert_close(regression_distillation_loss(student, teacher), expected)
    torch.testing.assert_close(
        regression_distillation_loss(student, teacher), F.mse_loss(student, teacher)
    )


def test_regression_distillation_mask():
    student, teacher = logits(6, seed=26), logits(6, seed=27)
    mask = torch.tensor([True, False, True, True, False, False])
    loss = regression_distillation_loss(student, teacher, mask)
    expected = ((student[mask] - teacher[mask]) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_regression_distillation_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        regression_distillation_loss(logits(4, 2), logits(4))


# ---------------------------------------------------------------- hard labels and targets


def test_hard_label_loss_is_cross_entropy_over_labelled_samples():
    scores = logits(6, 4, seed=28)
    labels = torch.tensor([0, IGNORE_INDEX, 3, 1, IGNORE_INDEX, 2])
    labelled = labels != IGNORE_INDEX
    log_p = torch.log_softmax(scores[labelled], dim=1)
    expected = -log_p[torch.arange(int(labelled.sum())), labels[labelled]].mean()
    torch.testing.assert_close(hard_label_loss(scores, labels), expected)
    torch.testing.assert_close(
        hard_label_loss(scores, labels), F.cross_entropy(scores[labelled], labels[labelled])
    )


def test_hard_label_loss_dense():
    scores = logits(2, 4, 3, 3, seed=29)
    labels = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    labels[0, 0, 0] = IGNORE_INDEX
    flat_scores, flat_labels = scores.permute(0, 2, 3, 1).reshape(-1, 4), labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    torch.testing.assert_close(
        hard_label_loss(scores, labels), F.cross_entropy(flat_scores[keep], flat_labels[keep])
    )


def test_hard_label_loss_all_ignored_is_zero_with_a_grad_path():
    scores = logits(3, 4, seed=30).requires_grad_()
    loss = hard_label_loss(scores, torch.full((3,), IGNORE_INDEX))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(scores.grad == 0)


def test_hard_target_loss_skips_nan_targets():
    outputs = logits(5, seed=31).requires_grad_()
    targets = torch.tensor([0.5, float("nan"), -1.0, float("nan"), 2.0])
    labelled = ~torch.isnan(targets)
    loss = hard_target_loss(outputs, targets)
    torch.testing.assert_close(
        loss.detach(), ((outputs.detach()[labelled] - targets[labelled]) ** 2).mean()
    )
    loss.backward()
    assert torch.isfinite(outputs.grad).all()
    assert torch.all(outputs.grad[~labelled] == 0)


def test_hard_target_loss_all_nan_gives_zero():
    loss = hard_target_loss(logits(3), torch.full((3,), float("nan")))
    assert loss.item() == 0.0


def test_hard_target_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        hard_target_loss(logits(3, 1), logits(3))


# ---------------------------------------------------------------- blend and the one-call loss


def test_blend_limits_and_arithmetic():
    kd, ce = torch.tensor(2.0), torch.tensor(10.0)
    assert blend(kd, ce, 0.0).item() == 10.0
    assert blend(kd, ce, 1.0).item() == 2.0
    assert blend(kd, ce, 0.3).item() == pytest.approx(0.3 * 2.0 + 0.7 * 10.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_blend_alpha_outside_unit_interval_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        blend(torch.tensor(1.0), torch.tensor(1.0), alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_is_blend_of_soft_targets_and_cross_entropy(alpha):
    student, teacher = logits(5, 4, seed=32), logits(5, 4, seed=33)
    labels = torch.tensor([1, IGNORE_INDEX, 0, 3, 2])
    expected = blend(
        soft_target_loss(student, teacher, 3.0), hard_label_loss(student, labels), alpha
    )
    torch.testing.assert_close(
        distillation_loss(student, teacher, labels, alpha=alpha, temperature=3.0), expected
    )


# ---------------------------------------------------------------- the tables


def test_hard_label_terms_call_the_right_functions():
    scores, labels = logits(4, 3, seed=36), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(
        HARD_LABEL_TERMS["classification"](scores, labels), F.cross_entropy(scores, labels)
    )
    outputs, targets = logits(4, seed=37), logits(4, seed=38)
    torch.testing.assert_close(
        HARD_LABEL_TERMS["regression"](outputs, targets), F.mse_loss(outputs, targets)
    )
