"""Continual distillation: task checks, exemplar memory, the LwF term, the accuracy matrix, a tiny
CLI run with report and resume by task, bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, stillroom_in_process
from stillroom.continual import (
    average_and_forgetting,
    check_class_tasks,
    lwf_loss,
    pick_memory,
)
from stillroom.errors import StillroomError
from stillroom.results import read_summary

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_continual.yaml"
TINY = ["continual.epochs=1", "continual.tasks=[[0,1,2,3,4],[5,6,7,8,9]]", "continual.memory=40"]


@pytest.mark.parametrize(
    ("tasks", "fragment"),
    [
        ([[0, 1], [1, 2]], "must not overlap"),
        ([[0, 1]], "leave out class(es) 2"),
        ([[0, 5]], "class 5"),
    ],
)
def test_bad_task_sequences(tasks: list[list[int]], fragment: str) -> None:
    with pytest.raises(StillroomError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_class_tasks(tasks, 3)


def test_memory_is_spread_over_classes() -> None:
    targets = torch.arange(4).repeat(50)
    index = pick_memory(targets, [0, 1, 2, 3], 10, seed=0)
    assert len(index) == 10 and torch.bincount(targets[index]).tolist() == [3, 3, 2, 2]


def test_lwf_loss_is_zero_on_identical_logits_and_ignores_new_classes() -> None:
    logits = torch.randn(8, 6)
    old = torch.tensor([0, 1, 2])
    assert lwf_loss(logits, logits, old, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    shifted = logits.clone()
    shifted[:, 3:] += 5.0  # new classes' logits do not enter the term
    assert lwf_loss(shifted, logits, old, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_average_and_forgetting() -> None:
    average, forgetting = average_and_forgetting([[1.0], [0.5, 0.9], [0.25, 0.8, 0.7]])
    assert average == pytest.approx((0.25 + 0.8 + 0.7) / 3)
    assert forgetting == pytest.approx(((1.0 - 0.25) + (0.9 - 0.8)) / 2)


def test_cli_run_report_and_resume_by_task(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["distill", RECIPE, *TINY, "--out", run_dir, "--no-progress"]
    result = stillroom_in_process(*args)
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert {m.name: m.role for m in summary.models} == {
        "finetune": "baseline",
        "lwf": "distilled",
        "lwf_memory": "distilled",
        "joint": "baseline",
    }
    matrix = json.loads((run_dir / "matrix.json").read_text())
    assert [len(row) for row in matrix["accuracy"]["lwf"]] == [1, 2]
    assert (run_dir / "accuracy_matrix.png").is_file()
    done = run_dir / "lwf_memory" / "task_1" / "done.json"
    before = json.loads(done.read_text())
    done.unlink()
    result = stillroom_in_process(*args[:-1], "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads(done.read_text())["accuracy"] == pytest.approx(before["accuracy"])
    report = stillroom_in_process("report", run_dir, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("continual.tasks=[[0,1],[1,2,3,4,5,6,7,8,9]]", "must not overlap"),
        ("continual.tasks=[[0,1],[2,3]]", "leave out class(es)"),
        ("continual.memory=100000", "larger than the"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, override: str, fragment: str
) -> None:
    run_dir = tmp_path / "run"
    result = stillroom_in_process("distill", RECIPE, *TINY, override, "--out", run_dir)
    assert_user_error(result, fragment)
    assert not run_dir.exists()
