"""Golden values under fixed seeds. Change one only with a stated reason in the commit message
(a deliberate change to a loss, the split, the loop's seeding or the default models)."""

from __future__ import annotations

import pytest
import torch

from stillroom.data import hide_labels, labelled_only, load_dataset, make_loader, split
from stillroom.losses import distillation_loss, soft_target_loss
from stillroom.models import build_model
from stillroom.teachers import CachedTeacher
from stillroom.train import distill


def test_loss_values() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    labels = torch.tensor([1, 5, -100, 9])
    assert soft_target_loss(student, teacher, 4.0).item() == pytest.approx(
        0.9211693406105042, rel=1e-6
    )
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(
        0.7760416865348816, rel=1e-6
    )
    assert distillation_loss(student, teacher, labels, 0.7, 2.0).item() == pytest.approx(
        1.3619420528411865, rel=1e-6
    )


def test_digits_split_and_few_labels() -> None:
    splits = split(load_dataset("digits"), 0.2, 0.1, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1259, 179, 359)
    assert splits.train.targets[:12].tolist() == [9, 7, 7, 6, 9, 6, 4, 2, 7, 9, 1, 1]
    # stratified: every class has 35-37 test samples
    assert splits.test.targets.bincount().tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert len(labelled_only(hide_labels(splits.train, 0.05, seed=0))) == 60


def test_two_epochs_of_distillation() -> None:
    splits = split(load_dataset("digits"), 0.2, 0.1, seed=0)
    teacher_logits = (
        torch.randn(len(splits.train), 10, generator=torch.Generator().manual_seed(1)) * 3
    )
    torch.manual_seed(0)
    student = build_model({"kind": "mlp", "hidden": [16]}, (1, 8, 8), 10)
    result = distill(
        CachedTeacher(teacher_logits),
        student,
        make_loader(splits.train, 64, shuffle=True),
        make_loader(splits.val, 512, shuffle=False),
        epochs=2,
        progress=False,
    )
    got = [
        (r["train/loss"], r["train/distillation"], r["train/hard_label"]) for r in result.history
    ]
    expected = [
        (3.5473872931634176, 3.6844683831603495, 2.313658113229644),
        (3.526966504959761, 3.66427512998331, 2.2911896915829684),
    ]
    assert got == [pytest.approx(e, rel=1e-5) for e in expected]
