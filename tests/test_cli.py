"""Tiny end-to-end runs through the real `stillroom` CLI, checking the files and numbers produced."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import ROOT, assert_user_error, stillroom, stillroom_in_process, tree_digest
from stillroom.config import load_recipe
from stillroom.data import make_loader
from stillroom.models import build_model, count_parameters, load_model
from stillroom.pipeline import prepare_data
from stillroom.train import evaluate

FEW_LABELS = ROOT / "recipes" / "digits_few_labels.yaml"
TINY = [
    "teacher.channels=[4]",
    "teacher.hidden=[16]",
    "teacher.train.epochs=2",
    "student.hidden=[8]",
    "distill.epochs=3",
]


@pytest.fixture(scope="module")
def few_label_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = stillroom_in_process("distill", FEW_LABELS, *TINY, "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    return out, result


def test_distill_writes_a_complete_run_folder(few_label_run) -> None:
    out, result = few_label_run
    for name in (
        "config.yaml",
        "soft_targets.safetensors",
        "results.json",
        "results.md",
        "curves.png",
        "size_vs_metric.png",
    ):
        assert (out / name).is_file(), name
    for role in ("teacher", "student_scratch", "student_kd"):
        for name in (
            "model.safetensors",
            "model.json",
            "metrics.jsonl",
            "best.safetensors",
            "train_args.json",
        ):
            assert (out / role / name).is_file(), f"{role}/{name}"
        assert (out / role / "checkpoints" / "latest.json").is_file()
    assert (out / "curves.png").stat().st_size > 10_000
    # the saved config is the fully resolved recipe, overrides included
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["distill"]["epochs"] == 3 and saved["data"]["label_fraction"] == 0.05
    # one metrics line per epoch, each with every loss term
    lines = [json.loads(x) for x in (out / "student_kd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train/loss", "train/distillation", "train/hard_label", "val/accuracy"} <= set(lines[0])
    assert "student_kd" in result.stdout and "gap closed" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "classic" and summary["primary"] == "student_kd"
    assert [m["role"] for m in summary["models"]] == ["teacher", "baseline", "distilled"]
    assert "T 4.0" in summary["settings"]["distillation"]
    # one latency per model: the table shows the report's measurement
    report = json.loads((out / "report" / "report.json").read_text())
    for model in summary["models"]:
        measured = report["models"][model["name"]]["latency_batch_1"]["p50_ms"]
        assert model["latency_ms"] == measured
        assert f"{measured:.3f} ms" in (out / "results.md").read_text()
    assert str(out / "results.md") in " ".join(result.stdout.split())
    # the run ends with the compression report's path
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report' / 'report.html'}"
    assert (out / "report" / "report.html").is_file()


def test_results_match_a_direct_measurement(few_label_run) -> None:
    out, _ = few_label_run
    results = json.loads((out / "results.json").read_text())
    recipe = load_recipe(FEW_LABELS, TINY)
    splits, student_train = prepare_data(recipe)
    test_loader = make_loader(splits.test, 512, shuffle=False)
    assert results["test_samples"] == len(splits.test)
    assert results["labelled_train_samples"] < 0.1 * results["train_samples"]
    for role, row in results["models"].items():
        model, _ = load_model(out / role)
        assert row["parameters"] == count_parameters(model)
        assert row["size_bytes"] == (out / role / "model.safetensors").stat().st_size
        assert row["accuracy"] == pytest.approx(
            evaluate(model, test_loader, "classification")["accuracy"]
        )
        assert row["latency_ms"] > 0
    rows = results["models"]
    expected_gap = (rows["student_kd"]["accuracy"] - rows["student_scratch"]["accuracy"]) / (
        rows["teacher"]["accuracy"] - rows["student_scratch"]["accuracy"]
    )
    assert results["gap_closed"] == pytest.approx(expected_gap)
    # soft targets: the teacher's logits for every training input, row = sample id
    teacher, _ = load_model(out / "teacher")
    soft = load_file(str(out / "soft_targets.safetensors"))["outputs"]
    with torch.no_grad():
        expected = teacher.eval()(student_train.inputs)
    assert soft.shape == (len(student_train), 10)
    torch.testing.assert_close(soft, expected, rtol=1e-5, atol=1e-5)


def test_default_student_is_at_least_10x_smaller() -> None:
    recipe = load_recipe(None)
    teacher = build_model(recipe.teacher.spec(), (1, 8, 8), 10)
    student = build_model(recipe.student.spec(), (1, 8, 8), 10)
    assert count_parameters(teacher) >= 10 * count_parameters(student)


def test_existing_run_folder_is_never_overwritten(few_label_run) -> None:
    out, _ = few_label_run
    before = tree_digest(out)
    result = stillroom_in_process("distill", FEW_LABELS, *TINY, "--out", out, "--no-progress")
    assert_user_error(result, "already exists; pass --resume to continue it, --force to replace it")
    assert tree_digest(out) == before


def test_resume_of_a_finished_run_changes_no_weights(few_label_run) -> None:
    out, _ = few_label_run
    weights = {r: (out / r / "model.safetensors").read_bytes() for r in ("teacher", "student_kd")}
    result = stillroom_in_process(
        "distill", FEW_LABELS, *TINY, "--out", out, "--resume", "--no-progress", "--no-report"
    )
    assert result.returncode == 0, result.stderr
    assert {r: (out / r / "model.safetensors").read_bytes() for r in weights} == weights


def test_resume_with_another_recipe_is_refused(few_label_run) -> None:
    out, _ = few_label_run
    result = stillroom_in_process(
        "distill", FEW_LABELS, *TINY, "distill.alpha=0.5", "--out", out, "--resume"
    )
    assert_user_error(result, "the recipe differs from the one")


def test_force_replaces_only_a_run_folder(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = stillroom_in_process("distill", FEW_LABELS, *TINY, "--out", precious, "--force")
    assert_user_error(result, "--force only replaces a folder stillroom wrote")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_demo_runs_both_settings(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = stillroom_in_process("demo", *TINY, "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "(a) all labels" in result.stdout and "(b) few labels" in result.stdout
    for setting in ("all_labels", "few_labels"):
        results = json.loads((out / setting / "results.json").read_text())
        assert set(results["models"]) == {"teacher", "student_scratch", "student_kd"}
    # (b) reuses the teacher of (a): identical weights
    assert (out / "all_labels/teacher/model.safetensors").read_bytes() == (
        out / "few_labels/teacher/model.safetensors"
    ).read_bytes()
    assert (out / "demo.md").is_file()
    assert f"reports: {out / 'index.html'}" in result.stdout
    index = (out / "index.html").read_text()
    for setting in ("all_labels", "few_labels"):
        assert f"  {setting}: {out / setting / 'report' / 'report.html'}" in result.stdout
        assert f'href="{setting}/report/report.html"' in index
    assert "(b) few labels" in index and "gap closed" in index


def test_version_and_flags_without_a_type() -> None:
    from importlib.metadata import version

    assert stillroom_in_process("--version").stdout == f"stillroom {version('stillroom')}\n"
    help_text = stillroom_in_process("distill", "--help").stdout
    assert "--force" in help_text and "<bool>" not in help_text.split("--help")[0]


def test_regression_recipe_runs(tmp_path: Path) -> None:
    out = tmp_path / "reg"
    recipe = ROOT / "recipes" / "diabetes_regression.yaml"
    result = stillroom_in_process(
        "distill",
        recipe,
        "teacher.train.epochs=3",
        "distill.epochs=3",
        "--out",
        out,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "rmse" and results["task"] == "regression"
    assert all(np.isfinite(row["rmse"]) for row in results["models"].values())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["distill", "no/such.yaml"], "recipe no/such.yaml does not exist"),
        (
            ["distill", FEW_LABELS, "distill.alpah=1"],
            "unknown key 'distill.alpah'; did you mean 'alpha'?",
        ),
        (
            ["distill", FEW_LABELS, "distill.temperature=-2"],
            "distill.temperature: Input should be greater than 0",
        ),
        (
            ["distill", FEW_LABELS, "teacher.checkpoint=no/such/teacher"],
            "model folder no/such/teacher does not exist",
        ),
        (["distill", FEW_LABELS, "data.source=npz"], "data.source 'npz' needs data.path"),
        (
            ["distill", FEW_LABELS, "data.source=npz", "data.path=missing.npz"],
            "data file missing.npz does not exist",
        ),
        (
            ["distill", FEW_LABELS, "distill.loss=regression"],
            "distill.loss 'regression' does not fit the classification data",
        ),
        (["check", FEW_LABELS, "oops"], "override 'oops' must look like key=value"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path: Path, args: list, fragment: str) -> None:
    result = (
        stillroom_in_process(*args, "--out", tmp_path / "run")
        if args[0] == "distill"
        else stillroom_in_process(*args)
    )
    assert_user_error(result, fragment)


def test_invalid_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  alpha: 0.5\n   temperature: 2\n")
    assert_user_error(stillroom("check", bad), "invalid YAML at line")


def test_empty_dataset(tmp_path: Path) -> None:
    data = tmp_path / "empty.npz"
    np.savez(data, inputs=np.zeros((0, 4), np.float32), targets=np.zeros((0,), np.int64))
    result = stillroom_in_process(
        "distill", FEW_LABELS, "data.source=npz", f"data.path={data}", "--out", tmp_path / "r"
    )
    assert_user_error(result, "has no samples")


def test_teacher_with_another_class_count_is_refused(few_label_run, tmp_path: Path) -> None:
    out, _ = few_label_run
    data = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(data, inputs=rng.random((90, 1, 8, 8), dtype=np.float32), targets=np.arange(90) % 3)
    result = stillroom_in_process(
        "distill",
        FEW_LABELS,
        "data.source=npz",
        f"data.path={data}",
        f"teacher.checkpoint={out / 'teacher'}",
        "--out",
        tmp_path / "r",
    )
    assert_user_error(result, "with 10 outputs, but the data has (1, 8, 8) and 3")


def test_nan_loss_stops_with_the_step_and_term(tmp_path: Path) -> None:
    data = tmp_path / "nan.npz"
    inputs = np.full((60, 6), 3e38, dtype=np.float32)  # finite, but the first layer overflows
    np.savez(data, inputs=inputs, targets=np.arange(60) % 2)
    result = stillroom_in_process(
        "distill",
        FEW_LABELS,
        "data.source=npz",
        f"data.path={data}",
        "data.standardize=false",
        "teacher.kind=mlp",
        "--out",
        tmp_path / "r",
    )
    assert_user_error(
        result, "loss term 'hard_label' became nan at step 1 (epoch 1) in phase 'teacher'"
    )


def test_interrupted_run_resumes_to_the_same_student(
    few_label_run, tmp_path: Path, monkeypatch
) -> None:
    """Stop the recipe mid-way through the distilled student (as Ctrl-C would), resume via the CLI,
    and get byte-identical weights to the uninterrupted run."""
    import stillroom.train.loop as loop
    from stillroom.methods.classic import run_recipe

    reference, _ = few_label_run
    out = tmp_path / "interrupted"
    real_save, calls = loop.save_checkpoint, []

    def save_then_stop(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        if len(calls) == 2 + 3 + 2:  # teacher 2 epochs, scratch 3, then 2 of the student's 3
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(FEW_LABELS, TINY), out, progress=False)
    from stillroom.runs import release

    release(out)  # what the interrupted process's exit does: the folder is free again
    assert not (out / "student_kd" / "model.safetensors").exists()
    result = stillroom_in_process(
        "distill", FEW_LABELS, *TINY, "--out", out, "--resume", "--no-progress", "--no-report"
    )
    assert result.returncode == 0, result.stderr
    for role in ("teacher", "student_scratch", "student_kd"):
        assert (out / role / "model.safetensors").read_bytes() == (
            reference / role / "model.safetensors"
        ).read_bytes()
    epochs = [
        json.loads(x)["epoch"]
        for x in (out / "student_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3]


RESNET = ROOT / "recipes" / "digits_resnet.yaml"
RESNET_TINY = [
    "teacher.widths=[8, 16, 16]",
    "teacher.blocks=[1, 1, 1]",
    "teacher.train.epochs=1",
    "distill.epochs=2",
    "data.batch_size=256",
    "baseline=false",
]


def test_feature_distillation_then_export_carries_no_projector(tmp_path: Path) -> None:
    out = tmp_path / "resnet"
    result = stillroom_in_process(
        "distill", RESNET, *RESNET_TINY, "--out", out, "--no-progress", "--no-report"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "student_kd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train/hint:stages.2->stages.2"] > 0
    assert {f"train/attention_transfer:stages.{i}->stages.{i}" for i in range(3)} <= set(record)
    exported = stillroom_in_process("export", out)
    assert exported.returncode == 0, exported.stderr
    weights = load_file(str(out / "export" / "model.safetensors"))
    student, _ = load_model(out / "student_kd")
    assert set(weights) == set(student.state_dict())  # no projector, no objective state
    assert not any(m._forward_hooks for m in student.modules())


def test_bad_layer_name_in_a_term_lists_close_names(tmp_path: Path) -> None:
    result = stillroom_in_process(
        "distill",
        RESNET,
        *RESNET_TINY,
        "distill.terms=[{kind: hint, student: stage.2, teacher: stages.2}]",
        "--out",
        tmp_path / "r",
        "--no-progress",
        "--no-report",
    )
    assert_user_error(result, "has no module named 'stage.2'; closest: 'stages.2'")
    assert not (tmp_path / "r").exists()  # refused before any training or any file


def test_force_checks_everything_before_deleting(few_label_run) -> None:
    out, _ = few_label_run
    before = tree_digest(out)
    typo = stillroom_in_process(
        "distill", FEW_LABELS, *TINY, "distill.loss=regression", "--out", out, "--force"
    )
    assert_user_error(typo, "does not fit the classification data")
    own_teacher = stillroom_in_process(
        "distill",
        FEW_LABELS,
        *TINY,
        f"teacher.checkpoint={out / 'teacher'}",
        "--out",
        out,
        "--force",
    )
    assert_user_error(own_teacher, "--force would delete")
    assert tree_digest(out) == before


def test_out_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert_user_error(
        stillroom_in_process("distill", FEW_LABELS, *TINY, "--out", target), "is a file"
    )
    assert target.read_text() == "keep me"
