"""Multi-task distillation: per-task terms and masking, the multi-head model, the digit + slant
data, the Python API, and `stillroom distill recipes/digits_multitask.yaml` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.data.multitask import (
    hide_task_labels,
    image_slant,
    labelled_any,
    load_multitask,
    make_multitask_loader,
    split_multitask,
)
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.methods import load_method_recipe
from stillroom.methods.multitask import run_multitask
from stillroom.methods.multitask_distill import (
    TaskSpec,
    check_outputs,
    check_tasks,
    distill_multitask,
    multitask_soft_targets,
    multitask_terms,
)
from stillroom.models import build_model, load_model, save_model
from stillroom.models.multitask import MultiTaskNet, multitask_spec, total_outputs
from stillroom.objective import StepOutputs, build_objective

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = ROOT / "recipes" / "digits_multitask.yaml"
HEADS = {"digit": ("classification", 10), "slant": ("regression", 1)}
TINY = ["teacher.train.epochs=1", "distill.epochs=1", "data.batch_size=256"]


@pytest.fixture(scope="module")
def digits_tasks():
    return split_multitask(load_multitask("digits"), 0.2, 0.1, seed=0)


# --- terms and masking ------------------------------------------------------------------------


def test_two_weighted_terms_per_task() -> None:
    tasks = [
        TaskSpec("a", "classification", weight=2.0, alpha=0.75, temperature=3.0),
        TaskSpec("b", "regression", weight=0.5, alpha=0.2),
        TaskSpec("c", "classification", loss="dkd", dkd_beta=2.0),
    ]
    terms = {t.name: t for t in multitask_terms(tasks)}
    assert list(terms) == [
        "a/soft_target",
        "a/hard_label",
        "b/regression",
        "b/hard_label",
        "c/dkd",
        "c/hard_label",
    ]
    assert terms["a/soft_target"].weight == pytest.approx(1.5)  # w * alpha
    assert terms["a/soft_target"].temperature == 3.0
    assert terms["a/hard_label"].weight == pytest.approx(0.5)  # w * (1 - alpha)
    assert terms["b/regression"].weight == pytest.approx(0.1)
    assert terms["b/hard_label"].weight == pytest.approx(0.4)
    assert terms["c/dkd"].dkd_beta == 2.0
    assert all(t.output == t.name.split("/")[0] for t in terms.values())
    assert terms["b/hard_label"].task == "regression"
    # without a teacher: each task's labels, at the task's weight
    alone = multitask_terms(tasks, with_teacher=False)
    assert [(t.name, t.weight) for t in alone] == [
        ("a/hard_label", 2.0),
        ("b/hard_label", 0.5),
        ("c/hard_label", 1.0),
    ]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([TaskSpec("a", "classification"), TaskSpec("a", "regression")], "'a' is listed twice"),
        ([TaskSpec("a", "regression", loss="soft_target")], "does not fit a regression task"),
        ([TaskSpec("a", "ranking")], "kind must be one of classification, regression"),
        ([], "at least one task"),
    ],
)
def test_bad_task_lists_are_refused(tasks: list[TaskSpec], message: str) -> None:
    with pytest.raises(StillroomError, match=message):
        check_tasks(tasks)


def test_a_missing_label_adds_no_hard_label_loss_but_keeps_its_soft_target() -> None:
    tasks = [TaskSpec("a", "classification", alpha=0.5), TaskSpec("b", "regression", alpha=0.5)]
    kinds = {"a": "classification", "b": "regression"}
    terms = build_objective(
        multitask_terms(tasks), "classification", nn.Linear(1, 1), None, None, kinds
    )
    torch.manual_seed(0)
    student = {
        "a": torch.randn(4, 3, requires_grad=True),
        "b": torch.randn(4, 1, requires_grad=True),
    }
    teacher = {"a": torch.randn(4, 3), "b": torch.randn(4, 1)}
    # sample 3 has no class label, sample 1 no regression target
    targets = {
        "a": torch.tensor([0, 1, 2, IGNORE_INDEX]),
        "b": torch.tensor([0.5, float("nan"), 1.0, 2.0]),
    }
    step = StepOutputs(student, teacher, targets)
    values = {t.name: t.compute(step) for t in terms}

    # references over the labelled samples only
    assert values["a/hard_label"].item() == pytest.approx(
        F.cross_entropy(student["a"][:3], targets["a"][:3]).item(), rel=1e-6
    )
    keep = torch.tensor([0, 2, 3])
    assert values["b/hard_label"].item() == pytest.approx(
        F.mse_loss(student["b"][keep, 0], targets["b"][keep]).item(), rel=1e-6
    )
    for task, row, kd in (("a", 3, "a/soft_target"), ("b", 1, "b/regression")):
        hard = torch.autograd.grad(values[f"{task}/hard_label"], student[task], retain_graph=True)[
            0
        ]
        soft = torch.autograd.grad(values[kd], student[task], retain_graph=True)[0]
        assert torch.all(hard[row] == 0), f"{task}: the unlabelled sample moved the hard-label loss"
        assert hard.abs().sum() > 0
        assert soft[row].abs().sum() > 0, f"{task}: the unlabelled sample lost its soft target"


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("trunk", ["mlp", "cnn"])
def test_heads_return_a_dict_and_round_trip_through_safetensors(trunk: str, tmp_path: Path) -> None:
    spec = multitask_spec(HEADS, trunk=trunk, hidden=[32, 16], channels=[8], head_hidden=[8])
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), total_outputs(HEADS))
    assert isinstance(model, MultiTaskNet) and model.head_specs == HEADS
    x = torch.rand(5, 1, 8, 8)
    out = model.eval()(x)
    assert list(out) == ["digit", "slant"]
    assert out["digit"].shape == (5, 10) and out["slant"].shape == (5, 1)
    save_model(model, spec, tmp_path, input_shape=[1, 8, 8], num_outputs=total_outputs(HEADS))
    loaded, meta = load_model(tmp_path)
    assert meta["spec"]["heads"] == {"digit": ["classification", 10], "slant": ["regression", 1]}
    again = loaded.eval()(x)
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_bad_model_specs_are_user_errors() -> None:
    with pytest.raises(StillroomError, match="11 outputs in all, but 3"):
        build_model(multitask_spec(HEADS), (1, 8, 8), 3)
    with pytest.raises(StillroomError, match="must be an identifier"):
        build_model(multitask_spec({"a.b": ("regression", 1)}), (64,), 1)
    with pytest.raises(StillroomError, match="cnn needs image inputs"):
        build_model(multitask_spec(HEADS, trunk="cnn"), (64,), 11)


# --- the data -----------------------------------------------------------------------------------


def test_slant_is_signed_by_the_lean_of_the_strokes() -> None:
    upright = torch.zeros(1, 8, 8)
    upright[0, :, 3] = 1.0
    leaning = torch.zeros(2, 8, 8)
    for row in range(8):
        leaning[0, row, 7 - row] = 1.0  # "/": the top leans right
        leaning[1, row, row] = 1.0  # "\"
    assert image_slant(upright).abs().item() < 1e-6
    slant = image_slant(leaning)
    assert slant[0].item() == pytest.approx(1.0) and slant[1].item() == pytest.approx(-1.0)


def test_digits_tasks_splits_and_per_task_label_fractions(digits_tasks) -> None:
    train = digits_tasks.train
    assert {t: (i.kind, i.num_outputs) for t, i in train.tasks.items()} == HEADS
    slant = train.targets["slant"]
    assert abs(slant.mean().item()) < 1e-4 and slant.std().item() == pytest.approx(1.0, abs=1e-3)
    few = hide_task_labels(train, {"digit": 1.0, "slant": 0.1}, seed=0)
    counts = few.label_counts()
    assert counts["digit"] == len(train)
    assert counts["slant"] == round(0.1 * len(train))
    both = hide_task_labels(train, {"digit": 0.1, "slant": 0.1}, seed=0)
    # each task hides its own samples: the labelled sets differ
    assert not torch.equal(both.labelled("digit"), both.labelled("slant"))
    assert len(labelled_any(both)) == int((both.labelled("digit") | both.labelled("slant")).sum())
    inputs, targets, index = next(iter(make_multitask_loader(few, 16, shuffle=False)))
    assert inputs.shape == (16, 1, 8, 8) and set(targets) == {"digit", "slant"}
    assert targets["digit"].dtype == torch.int64 and targets["slant"].dtype == torch.float32
    assert torch.equal(index, torch.arange(16))


def test_npz_tasks_come_from_their_dtypes(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "mine.npz"
    labels = np.array([0, 2, IGNORE_INDEX, 1])
    np.savez(path, inputs=np.zeros((4, 3)), target_kind=labels, target_size=np.arange(4.0))
    data = load_multitask("npz", path)
    assert {t: (i.kind, i.num_outputs) for t, i in data.tasks.items()} == {
        "kind": ("classification", 3),
        "size": ("regression", 1),
    }
    assert data.label_counts() == {"kind": 3, "size": 4}
    np.savez(path, inputs=np.zeros((4, 3)), targets=labels)
    with pytest.raises(StillroomError, match="one 'target_<task>' array per task"):
        load_multitask("npz", path)


# --- the Python API ------------------------------------------------------------------------------


def test_distill_multitask_logs_every_task_and_term(digits_tasks) -> None:
    train = hide_task_labels(digits_tasks.train.subset(torch.arange(192)), {"slant": 0.25}, seed=0)
    val = digits_tasks.val.subset(torch.arange(64))
    loader = make_multitask_loader(train, 64, shuffle=True)
    val_loader = make_multitask_loader(val, 64, shuffle=False)
    torch.manual_seed(0)
    teacher = build_model(multitask_spec(HEADS, hidden=[32]), (1, 8, 8), 11)
    tasks = [TaskSpec("digit", "classification"), TaskSpec("slant", "regression", alpha=0.5)]
    fast = {"epochs": 2, "lr": 1e-2, "progress": False}
    distill_multitask(None, teacher, loader, val_loader, tasks, **fast)
    cached = multitask_soft_targets(
        teacher, make_multitask_loader(train, 64, False), ["digit", "slant"]
    )
    assert cached.tasks["slant"].outputs.shape == (192, 1)
    student = build_model(multitask_spec(HEADS, hidden=[16]), (1, 8, 8), 11)
    result = distill_multitask(cached, student, loader, val_loader, tasks, select="slant", **fast)
    last = result.history[-1]
    expected = {"val/digit/accuracy", "val/slant/rmse", "train/digit/soft_target"}
    expected |= {"train/digit/hard_label", "train/slant/regression", "train/slant/hard_label"}
    assert expected <= last.keys()
    assert result.metric == "slant/rmse"

    missing = build_model(multitask_spec({"digit": ("classification", 10)}), (1, 8, 8), 10)
    with pytest.raises(
        StillroomError, match="the student has no head for task 'slant'; its heads: digit"
    ):
        distill_multitask(cached, missing, loader, val_loader, tasks, **fast)
    five = build_model(multitask_spec({**HEADS, "digit": ("classification", 5)}), (1, 8, 8), 6)
    with pytest.raises(StillroomError, match=r"student's head gives \(5,\) .* teacher's \(10,\)"):
        check_outputs(five, teacher, tasks, next(iter(loader)))


# --- the recipe and the CLI ----------------------------------------------------------------------


def test_cli_runs_the_recipe_and_reports_every_task(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = stillroom_in_process("distill", RECIPE, "--out", out, *TINY, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "slant/rmse" in result.stdout and "gap closed on slant" in result.stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["method"] == "multitask" and set(payload["tasks"]) == {"digit", "slant"}
    assert payload["tasks"]["slant"]["labelled_train_samples"] == round(
        0.05 * payload["train_samples"]
    )
    for role in ("teacher", "student_scratch", "student_kd"):
        row = payload["models"][role]
        assert 0.0 <= row["digit/accuracy"] <= 1.0 and row["slant/rmse"] > 0
        assert (out / role / "model.safetensors").is_file()
    assert (
        payload["models"]["student_kd"]["parameters"] < payload["models"]["teacher"]["parameters"]
    )
    targets = load_file(str(out / "soft_targets.safetensors"))
    assert targets["digit"].shape == (payload["train_samples"], 10)
    assert targets["slant"].shape == (payload["train_samples"], 1)
    record = json.loads((out / "student_kd" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val/digit/accuracy", "val/slant/rmse", "train/slant/regression"} <= record.keys()
    assert "gap closed on digit" in (out / "results.md").read_text()
    student, _ = load_model(out / "student_kd")
    assert set(student.head_specs) == {"digit", "slant"}


def test_resume_finishes_and_a_rerun_needs_force(tmp_path: Path) -> None:
    _, recipe = load_method_recipe(RECIPE, [*TINY, "baseline=false"])
    first = run_multitask(recipe, tmp_path / "run", progress=False)
    finished = {
        path: path.stat().st_mtime_ns for path in (tmp_path / "run").glob("*/*") if path.is_file()
    }
    again = run_multitask(recipe, tmp_path / "run", resume=True, progress=False)
    assert again.rows["student_kd"]["digit/accuracy"] == first.rows["student_kd"]["digit/accuracy"]
    # finished phases are loaded, not re-entered: none of their files is rewritten
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    with pytest.raises(StillroomError, match="already exists"):
        run_multitask(recipe, tmp_path / "run", progress=False)


def test_cli_a_student_missing_a_head_fails_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill", RECIPE, "--out", out, "student.heads=[digit]", "--no-progress"
    )
    assert_user_error(result, "the student has no head for task 'slant'; its heads: digit. Add")
    assert not out.exists()


def test_a_loaded_teacher_missing_a_head_fails_before_anything_is_written(tmp_path: Path) -> None:
    spec = multitask_spec({"digit": ("classification", 10)}, hidden=[16])
    teacher = tmp_path / "teacher"
    save_model(
        build_model(spec, (1, 8, 8), 10), spec, teacher, input_shape=[1, 8, 8], num_outputs=10
    )
    _, recipe = load_method_recipe(RECIPE, [f"teacher.checkpoint={teacher}"])
    with pytest.raises(StillroomError) as info:
        run_multitask(recipe, tmp_path / "run", progress=False)
    assert f"teacher {teacher} has no head for task 'slant'; its heads: digit." in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["tasks=[{name: digit, kind: classification}, {name: digit, kind: classification}]"],
            "task 'digit' is listed twice",
        ),
        (
            ["tasks=[{name: digit, kind: classification}, {name: slant, kind: classification}]"],
            "'slant' is declared classification, but in data 'digits' it is regression",
        ),
        (["tasks=[{name: ink, kind: regression}]", "distill.select=null"], "has no task 'ink'"),
        (
            ["tasks=[{name: slant, kind: regression, temperature: 2}]"],
            "a regression task has none",
        ),
        (["student.heads=[digit, slant, ink]"], "student.heads names 'ink', which is not a task"),
        (["distill.select=size"], "distill.select 'size' is not a task"),
    ],
)
def test_bad_recipes_fail_in_one_line_before_the_run_folder(
    overrides: list[str], fragment: str, tmp_path: Path
) -> None:
    with pytest.raises(StillroomError) as info:
        _, recipe = load_method_recipe(RECIPE, overrides)
        run_multitask(recipe, tmp_path / "run", progress=False)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()
