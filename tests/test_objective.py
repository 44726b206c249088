"""The objective: term table, building (projectors, layer maps), and distillation with feature terms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stillroom.data import make_loader
from stillroom.errors import StillroomError
from stillroom.losses import decoupled_kd_loss, hard_label_loss, hint_loss, soft_target_loss
from stillroom.models import build_model
from stillroom.objective import (
    TERMS,
    ObjectiveStudent,
    StepOutputs,
    TermSpec,
    build_objective,
    classic_terms,
)
from stillroom.train import distill

RESNET_TEACHER = {"kind": "resnet", "widths": [16, 32], "blocks": [1, 1]}
RESNET_STUDENT = {"kind": "resnet", "widths": [4, 8], "blocks": [1, 1]}
FAST = {"progress": False, "lr": 1e-2}


def resnet(spec: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec, (1, 8, 8), 10)


def test_classic_terms_are_the_blend() -> None:
    distillation, hard = classic_terms(0.7, 3.0, "soft_target")
    assert (distillation.kind, distillation.weight, distillation.temperature) == (
        "soft_target",
        0.7,
        3.0,
    )
    assert (hard.kind, hard.weight) == ("hard_label", pytest.approx(0.3))


def test_output_terms_compute_the_losses() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    labels = torch.tensor([1, 2, 3, -100, 5, 6])
    step = StepOutputs(student, teacher, labels)
    specs = [
        TermSpec("soft_target", temperature=2.0),
        TermSpec("dkd", temperature=2.0, dkd_alpha=0.5, dkd_beta=4.0),
        TermSpec("hard_label"),
    ]
    terms = build_objective(specs, "classification", torch.nn.Identity(), None, None)
    values = {t.name: t.compute(step) for t in terms}
    torch.testing.assert_close(values["soft_target"], soft_target_loss(student, teacher, 2.0))
    torch.testing.assert_close(
        values["dkd"], decoupled_kd_loss(student, teacher, labels, 0.5, 4.0, 2.0)
    )
    torch.testing.assert_close(values["hard_label"], hard_label_loss(student, labels))


def test_every_term_kind_is_buildable_by_name() -> None:
    assert set(TERMS) >= {
        "soft_target",
        "hint",
        "attention_transfer",
        "rkd_distance",
        "rkd_angle",
        "dkd",
    }


def test_hint_creates_a_projector_only_when_widths_differ() -> None:
    teacher, student = resnet(RESNET_TEACHER), resnet(RESNET_STUDENT)
    x = torch.randn(4, 1, 8, 8)
    specs = [
        TermSpec("hint", student="stages.1", teacher="stages.1"),
        TermSpec("hint", student="stages.0", teacher="stages.0", name="same"),
    ]
    terms = build_objective(
        specs, "classification", student, resnet({**RESNET_TEACHER, "widths": [4, 32]}), x
    )
    assert (
        isinstance(terms[0].projector, torch.nn.Conv2d | torch.nn.Module)
        and terms[0].projector is not None
    )
    assert terms[1].projector is None  # 4 channels on both sides: nothing to learn
    wrapped = ObjectiveStudent(student, terms)
    outputs, features = wrapped(x)
    assert outputs.shape == (4, 10)
    assert features["projected:hint:stages.1->stages.1"].shape[1] == 32
    assert features["stages.0"].shape[1] == 4
    assert all(not m._forward_hooks for m in student.modules())  # taps detach after each forward
    del teacher


def test_container_layers_pair_uniformly_or_by_map() -> None:
    teacher = resnet({"kind": "resnet", "widths": [8, 8, 8, 8], "blocks": [1, 1, 1, 1]})
    student = resnet({"kind": "resnet", "widths": [8, 8], "blocks": [1, 1]})
    x = torch.randn(2, 1, 8, 8)
    terms = build_objective(
        [TermSpec("hint", student="stages.*", teacher="stages.*")],
        "classification",
        student,
        teacher,
        x,
    )
    assert [t.name for t in terms] == ["hint:stages.0->stages.1", "hint:stages.1->stages.3"]
    mapped = build_objective(
        [TermSpec("hint", student="stages.*", teacher="stages.*", layer_map=((0, 0), (1, 2)))],
        "classification",
        student,
        teacher,
        x,
    )
    assert [t.teacher_layers for t in mapped] == [("stages.0",), ("stages.2",)]
    with pytest.raises(StillroomError, match=r"layer_map pair \(1, 7\) is out of range"):
        build_objective(
            [TermSpec("hint", student="stages.*", teacher="stages.*", layer_map=((1, 7),))],
            "classification",
            student,
            teacher,
            x,
        )


def test_bad_layer_name_lists_close_names() -> None:
    with pytest.raises(StillroomError, match=r"no module named .stage\.1.; closest: .stages\.1."):
        build_objective(
            [TermSpec("hint", student="stage.1", teacher="stages.1")],
            "classification",
            resnet(RESNET_STUDENT),
            resnet(RESNET_TEACHER),
            torch.randn(2, 1, 8, 8),
        )


def test_feature_terms_need_a_live_teacher() -> None:
    with pytest.raises(StillroomError, match="need a live teacher module"):
        build_objective(
            [TermSpec("hint", student="stages.1", teacher="stages.1")],
            "classification",
            resnet(RESNET_STUDENT),
            None,
            torch.randn(2, 1, 8, 8),
        )


def test_unknown_term_kind() -> None:
    with pytest.raises(StillroomError, match="unknown term kind 'fitnet'"):
        build_objective([TermSpec("fitnet")], "classification", torch.nn.Identity(), None, None)


@pytest.fixture
def loaders(digits):
    return make_loader(digits.train, 32, shuffle=True), make_loader(digits.val, 64, shuffle=False)


def test_distill_with_feature_terms_logs_each_and_saves_the_student_alone(
    loaders, tmp_path: Path
) -> None:
    train, val = loaders
    teacher, student = resnet(RESNET_TEACHER, seed=1), resnet(RESNET_STUDENT)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    terms = (
        TermSpec("hint", weight=1.0, student="stages.1", teacher="stages.1"),
        TermSpec("attention_transfer", weight=100.0, student="stages.0", teacher="stages.0"),
        TermSpec("rkd_distance", weight=1.0, student="pool", teacher="pool"),
    )
    result = distill(
        teacher, student, train, val, run_dir=tmp_path / "run", epochs=2, terms=terms, **FAST
    )
    record = result.history[-1]
    names = [
        "train/hint:stages.1->stages.1",
        "train/attention_transfer:stages.0->stages.0",
        "train/rkd_distance:pool->pool",
    ]
    for key in [*names, "train/distillation", "train/hard_label"]:
        assert key in record and record[key] > 0, key
    expected = 0.9 * record["train/distillation"] + 0.1 * record["train/hard_label"]
    expected += record[names[0]] + 100.0 * record[names[1]] + record[names[2]]
    assert record["train/loss"] == pytest.approx(expected, rel=1e-5)
    # the teacher never changes; the saved student carries no projector and no hook
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert set(best) == set(student.state_dict())
    assert all(not m._forward_hooks for m in result.student.modules())
    ckpt = (
        tmp_path
        / "run"
        / "checkpoints"
        / json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["dir"]
    )
    projector = load_file(str(ckpt / "objective.safetensors"))
    assert projector and all(k.startswith("p0.") for k in projector)


def test_resume_with_a_projector_matches_uninterrupted(
    loaders, tmp_path: Path, monkeypatch
) -> None:
    import stillroom.train.loop as loop

    train, val = loaders
    terms = (TermSpec("hint", student="stages.1", teacher="stages.1"),)
    full = distill(
        resnet(RESNET_TEACHER, 1),
        resnet(RESNET_STUDENT),
        train,
        val,
        run_dir=tmp_path / "a",
        epochs=3,
        terms=terms,
        **FAST,
    )

    real_save, calls = loop.save_checkpoint, []

    def stop_after_first(*args, **kwargs):
        calls.append(real_save(*args, **kwargs))
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        distill(
            resnet(RESNET_TEACHER, 1),
            resnet(RESNET_STUDENT),
            train,
            val,
            run_dir=tmp_path / "b",
            epochs=3,
            terms=terms,
            **FAST,
        )
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = distill(
        resnet(RESNET_TEACHER, 1),
        resnet(RESNET_STUDENT),
        train,
        val,
        run_dir=tmp_path / "b",
        resume=True,
        epochs=3,
        terms=terms,
        **FAST,
    )
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key


def test_hint_loss_decreases_with_training(loaders) -> None:
    train, val = loaders
    terms = (TermSpec("hint", student="stages.1", teacher="stages.1"),)
    result = distill(
        resnet(RESNET_TEACHER, 1),
        resnet(RESNET_STUDENT),
        train,
        val,
        epochs=4,
        alpha=0.0,
        terms=terms,
        **FAST,
    )
    hints = [r["train/hint:stages.1->stages.1"] for r in result.history]
    assert hints[-1] < hints[0]
    assert hint_loss is not None


def test_a_hint_between_incompatible_layers_is_a_clear_error() -> None:
    student = build_model({"kind": "mlp", "hidden": [16]}, (1, 8, 8), 10)
    teacher = resnet(RESNET_TEACHER)
    with pytest.raises(StillroomError, match=r"term 'hint' net\.1 -> stages\.1: "):
        build_objective(
            [TermSpec("hint", student="net.1", teacher="stages.1")],
            "classification",
            student,
            teacher,
            torch.randn(2, 1, 8, 8),
        )
