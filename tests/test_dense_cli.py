"""method dense through the real CLI: the shipped recipes made tiny, run end to end, with the
files and numbers they produce checked; resume; bad input in one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_user_error, stillroom_in_process, tree_digest
from stillroom.methods import load_method_recipe
from stillroom.methods.dense import read_dense

ROOT = Path(__file__).parent.parent
SEGMENTATION = ROOT / "recipes" / "scenes_segmentation.yaml"
DETECTION = ROOT / "recipes" / "scenes_detection.yaml"
TINY = [
    "data.train_scenes=32",
    "data.val_scenes=8",
    "data.test_scenes=8",
    "data.batch_size=16",
    "teacher.channels=[8, 8, 16]",
    "teacher.epochs=1",
    "distill.epochs=1",
]


def _run(recipe: Path, out: Path, *extra: str):
    return stillroom_in_process("distill", recipe, *TINY, *extra, "--out", out, "--no-progress")


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "seg"
    result = _run(SEGMENTATION, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def detection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "det"
    result = _run(DETECTION, out)
    assert result.returncode == 0, result.stderr
    return out


def test_segmentation_run_writes_every_model_and_its_miou(segmentation: Path) -> None:
    summary = json.loads((segmentation / "summary.json").read_text())
    assert summary["method"] == "dense" and summary["metric"] == "miou"
    names = [m["name"] for m in summary["models"]]
    assert names == [
        "teacher",
        "student_scratch",
        "student_soft_target",
        "student_cwd",
        "student_features",
    ]
    results = json.loads((segmentation / "results.json").read_text())
    for name in names:
        assert (segmentation / name / "model.safetensors").is_file()
        row = results["models"][name]
        assert 0 <= row["miou"] <= 1 and 0 <= row["pixel_accuracy"] <= 1
    assert (
        results["models"]["teacher"]["parameters"] > results["models"]["student_cwd"]["parameters"]
    )
    assert set(results["gap_closed"]) == {"student_soft_target", "student_cwd", "student_features"}
    assert results["primary"] in results["gap_closed"]
    # every variant trained its own terms beside the labels'
    for name, term in (("student_cwd", "train/cwd"), ("student_features", "train/hint")):
        first = json.loads((segmentation / name / "metrics.jsonl").read_text().splitlines()[0])
        assert first["train/hard_label"] > 0 and any(k.startswith(term) for k in first)
    assert "gap closed" in (segmentation / "results.md").read_text()


def test_detection_run_reports_map50_by_cocoeval(detection: Path) -> None:
    results = json.loads((detection / "results.json").read_text())
    assert results["metric"] == "map50"
    assert set(results["models"]) == {
        "teacher",
        "student_scratch",
        "student_heatmap_box",
        "student_cwd",
        "student_features",
    }
    for row in results["models"].values():
        assert 0 <= row["map"] <= row["map50"] <= 1
    first = (detection / "student_heatmap_box" / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(first)
    assert record["train/heatmap"] > 0 and record["train/box"] >= 0 and "val/map50" in record


def test_resume_loads_the_finished_phases(segmentation: Path) -> None:
    before = tree_digest(segmentation / "student_cwd")
    result = _run(SEGMENTATION, segmentation, "--resume")
    assert result.returncode == 0, result.stderr
    assert tree_digest(segmentation / "student_cwd") == before


def test_own_npz_masks_with_classes_beyond_the_head_are_one_line(tmp_path: Path) -> None:
    masks = np.zeros((20, 16, 16), np.int64)
    masks[3, 4:8, 4:8] = 4
    path = tmp_path / "own.npz"
    np.savez(path, inputs=np.zeros((20, 1, 16, 16), np.float32), masks=masks)
    result = _run(
        SEGMENTATION, tmp_path / "run", "data.source=npz", f"data.path={path}", "data.num_classes=3"
    )
    assert_user_error(result, "masks hold class 4 but the head has 3 classes")
    assert not (tmp_path / "run").exists()


def test_own_npz_boxes_outside_the_image_are_one_line(tmp_path: Path) -> None:
    boxes = np.full((20, 2, 5), -1.0, np.float32)
    boxes[:, 0] = [0, 1, 1, 9, 9]
    boxes[7, 1] = [1, 10, 10, 17, 12]
    path = tmp_path / "own.npz"
    np.savez(path, inputs=np.zeros((20, 1, 16, 16), np.float32), boxes=boxes)
    result = _run(DETECTION, tmp_path / "run", "data.source=npz", f"data.path={path}")
    assert_user_error(result, "box [10.0, 10.0, 17.0, 12.0] of image 7 is outside the 16x16 image")


def test_own_npz_reads_into_splits_with_the_files_classes(tmp_path: Path) -> None:
    masks = np.zeros((20, 16, 16), np.int64)
    masks[:, :4] = 2
    path = tmp_path / "own.npz"
    np.savez(path, inputs=np.zeros((20, 3, 16, 16), np.float32), masks=masks)
    _, recipe = load_method_recipe(SEGMENTATION, ["data.source=npz", f"data.path={path}"])
    train, val, test, record = read_dense(recipe)
    assert (len(train), len(val), len(test)) == (14, 3, 3)
    assert record["classes"] == 3 and train.input_shape == (3, 16, 16)


def test_outputs_of_two_resolutions_for_a_pixel_term_are_one_line(tmp_path: Path) -> None:
    result = _run(SEGMENTATION, tmp_path / "run", "student.output_stride=2")
    assert_user_error(result, "term soft_target compares outputs pixel by pixel")
    assert not (tmp_path / "run").exists()
