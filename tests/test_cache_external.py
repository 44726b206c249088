"""`stillroom cache` with a teacher from another framework (ONNX, scikit-learn via skops), through
the CLI in-process: the store's teacher fingerprint is the file's sha256, its logits are the
teacher's own, and `stillroom distill ... teacher.store=DIR` trains from it (and refuses a store
of another file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.config import load_recipe
from stillroom.data import to_user_units
from stillroom.models.external import PROBABILITY_FLOOR, OnnxModule
from stillroom.pipeline import data_classes, prepare_data
from stillroom.store import SoftTargetStore, StoreTeacher

DIGITS = ROOT / "recipes" / "digits.yaml"
SKLEARN = ROOT / "recipes" / "own_sklearn_teacher.yaml"
SMALL_DISTILL = ["student.hidden=[8]", "distill.epochs=2", "baseline=false"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_linear(path: Path, seed: int) -> Path:
    """An untrained 64 -> 10 digits classifier as ONNX: a teacher is a teacher for caching."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    torch.onnx.export(
        net,
        (torch.zeros(2, 1, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return export_linear(folder / "teacher.onnx", 0), export_linear(folder / "other.onnx", 1)


@pytest.fixture(scope="module")
def onnx_store(tmp_path_factory: pytest.TempPathFactory, onnx_files) -> tuple[Path, list[str]]:
    teacher = ["teacher.kind=onnx", f"teacher.path={onnx_files[0]}"]
    store = tmp_path_factory.mktemp("stores") / "onnx"
    result = stillroom_in_process(
        "cache", DIGITS, *teacher, "--out", store, "--precision", "fp32", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    return store, teacher


def test_onnx_teacher_cached_with_the_files_sha256(onnx_store, onnx_files) -> None:
    store, teacher = onnx_store
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "dense"
    assert manifest["teacher"]["sha256"] == sha256(onnx_files[0])
    assert manifest["teacher"]["files"] == {str(onnx_files[0].resolve()): sha256(onnx_files[0])}
    assert manifest["teacher"]["parameters"] == 64 * 10 + 10
    _, train = prepare_data(load_recipe(DIGITS, teacher))
    assert manifest["num_samples"] == len(train)
    ids = torch.tensor([0, 5, len(train) - 1])
    module = OnnxModule(onnx_files[0])
    cached = StoreTeacher(store, teacher=module, data=train)(train.inputs[ids], ids)
    torch.testing.assert_close(cached, module(train.inputs[ids]))


def test_distill_trains_from_the_onnx_store(onnx_store, tmp_path: Path) -> None:
    store, teacher = onnx_store
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        DIGITS,
        *teacher,
        f"teacher.store={store}",
        *SMALL_DISTILL,
        "--out",
        out,
        "--no-progress",
        "--no-report",
    )
    assert result.returncode == 0, result.stderr
    lines = (out / "student_kd" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 and records[0]["train/distillation"] > 0


def test_distill_refuses_the_store_of_another_onnx_file(onnx_store, onnx_files, tmp_path) -> None:
    store, _ = onnx_store
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        DIGITS,
        "teacher.kind=onnx",
        f"teacher.path={onnx_files[1]}",
        f"teacher.store={store}",
        *SMALL_DISTILL,
        "--out",
        out,
        "--no-progress",
        "--no-report",
    )
    assert_user_error(
        result, f"by a different teacher (weights sha256 {sha256(onnx_files[0])[:12]}"
    )
    assert not out.exists()


def test_a_teacher_file_that_does_not_fit_the_data_is_one_line(onnx_files, tmp_path) -> None:
    out = tmp_path / "store"
    result = stillroom_in_process(
        "cache",
        DIGITS,
        "data.source=diabetes",
        "distill.loss=regression",
        "teacher.kind=onnx",
        f"teacher.path={onnx_files[0]}",
        "--out",
        out,
        "--no-progress",
    )
    assert_user_error(result, "ONNX teacher")
    assert not out.exists()


def test_sklearn_teacher_on_a_standardised_table(tmp_path: Path) -> None:
    """A logistic regression fitted on raw features: the store holds its log-probabilities for
    the training rows, which the students see standardised; distill then trains from it."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    size, depth = rng.normal(50, 10, 200), rng.normal(-3, 2, 200)
    label = np.where((size - 50) / 10 + (depth + 3) / 2 > 0, "yes", "no")
    table = tmp_path / "shop.csv"
    rows = [f"{s},{d},{y}" for s, d, y in zip(size, depth, label, strict=True)]
    table.write_text("size,depth,label\n" + "\n".join(rows) + "\n")
    model = LogisticRegression().fit(np.stack([size, depth], axis=1), label)
    path = tmp_path / "logistic.skops"
    skops.io.dump(model, path)
    overrides = [f"data.path={table}", "data.label=label", f"teacher.path={path}"]

    store = tmp_path / "store"
    result = stillroom_in_process(
        "cache", SKLEARN, *overrides, "--out", store, "--precision", "fp32", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    opened = SoftTargetStore.open(store, verify=True)
    assert opened.manifest.teacher["sha256"] == sha256(path)
    splits, train = prepare_data(load_recipe(SKLEARN, overrides))
    assert train.preprocess and len(opened) == len(train)  # the students' inputs are standardised
    raw = to_user_units(train).inputs.numpy()
    columns = [list(model.classes_).index(c) for c in data_classes(splits)]
    expected = np.log(np.clip(model.predict_proba(raw), PROBABILITY_FLOOR, None))[:, columns]
    logits = opened.logits(np.arange(len(train))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        SKLEARN,
        *overrides,
        f"teacher.store={store}",
        *SMALL_DISTILL,
        "--out",
        out,
        "--no-progress",
        "--no-report",
    )
    assert result.returncode == 0, result.stderr
    records = [
        json.loads(x) for x in (out / "student_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 2 and records[0]["train/distillation"] > 0
