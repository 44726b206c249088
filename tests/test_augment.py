"""Training-time augmentation (stillroom.data.augment): shifts move pixels as stated, each batch's
draw is seeded by (seed, batch) so runs and resumes replay, and bad settings are one line."""

from __future__ import annotations

import pytest
import torch

from stillroom.data.augment import Augment, AugmentSection, shift
from stillroom.errors import StillroomError


def test_a_shift_moves_each_image_within_the_bound_and_fills_zeros() -> None:
    images = torch.zeros(64, 1, 8, 8)
    images[:, 0, 3, 4] = 1.0  # one lit pixel per image
    moved = shift(images, 2, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and torch.all(moved.sum((1, 2, 3)) == 1)
    where = moved[:, 0].flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert rows.sub(3).abs().max() <= 2 and cols.sub(4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # per-sample offsets
    # a shift of 0 pixels is the identity
    assert torch.equal(shift(images, 0, torch.Generator()), images)


def test_each_batch_replays_from_seed_and_batch_count() -> None:
    section = AugmentSection(shift=1, flip=True, noise=0.1, input_dropout=0.2)
    augment = Augment(section, (1, 8, 8), seed=3)
    x = torch.rand(16, 1, 8, 8)
    first = augment(x, None, None, None, 7)[0]
    assert torch.equal(first, augment(x, None, None, None, 7)[0])  # a resumed run: the same view
    assert not torch.equal(first, augment(x, None, None, None, 8)[0])
    assert not torch.equal(first, Augment(section, (1, 8, 8), seed=4)(x, None, None, None, 7)[0])
    assert torch.equal(x, x.clone())  # the caller's batch is not modified


def test_input_dropout_keeps_the_expected_value() -> None:
    augment = Augment(AugmentSection(input_dropout=0.5), (100,), seed=0)
    x = torch.ones(200, 100)
    out = augment(x, None, None, None, 0)[0]
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert abs(out.mean().item() - 1.0) < 0.02


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(StillroomError, match="move pixels of images"):
        Augment(AugmentSection(shift=2), (64,), seed=0)
    with pytest.raises(StillroomError, match="entirely out of view"):
        Augment(AugmentSection(shift=8), (1, 8, 8), seed=0)
    assert not AugmentSection().active and AugmentSection(noise=0.1).active


def test_an_augmented_run_through_the_cli_with_an_equal_steps_baseline(tmp_path) -> None:
    import json

    from helpers import ROOT, assert_user_error, stillroom_in_process

    small = [
        "teacher.kind=mlp", "teacher.hidden=[16]", "teacher.train.epochs=1", "student.hidden=[8]",
        "distill.epochs=2", "data.batch_size=128", "data.label_fraction=0.25",
        "data.augment.shift=1", "data.augment.noise=0.05", "baseline_equal_steps=true",
    ]  # fmt: skip
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill", ROOT / "recipes" / "digits.yaml", *small, "--out", out, "--no-progress",
        "--no-report",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    epochs = {
        role: len((out / role / "metrics.jsonl").read_text().splitlines())
        for role in ("student_scratch", "student_kd")
    }
    # a quarter of the labels: the scratch student gets 4x the epochs (the same steps)
    assert epochs == {"student_scratch": 8, "student_kd": 2}
    assert json.loads((out / "summary.json").read_text())["models"]
    store = tmp_path / "store"
    store.mkdir()
    refused = stillroom_in_process(
        "distill", ROOT / "recipes" / "digits.yaml", *small, f"teacher.store={store}",
        "--out", tmp_path / "other",
    )  # fmt: skip
    assert_user_error(refused, "drop teacher.store")
    assert not (tmp_path / "other").exists()


def test_augmenting_the_teacher_alone_keeps_the_students_batches_plain() -> None:
    from stillroom.config import load_recipe
    from stillroom.pipeline import augment_of

    recipe = load_recipe(None, ["data.augment.shift=2", "data.augment.students=false"])
    assert augment_of(recipe, (1, 8, 8), students=False) is not None
    assert augment_of(recipe, (1, 8, 8)) is None
