"""Data larger than memory: read a batch at a time, never loaded whole, with the same numbers.

Every test forces the on-disk path with `data.memory_limit_mb=0` on tiny data and compares it with
the in-memory read of the same file: the same encoding, the same inputs (to float32 rounding of
the statistics), the same run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.data import DataSection, make_loader, prepare_splits, table_batches
from stillroom.data.mapped import MappedInputs
from stillroom.data.tables import read_table

SMALL = [
    "teacher.kind=mlp",
    "teacher.hidden=[32]",
    "teacher.train.epochs=2",
    "student.hidden=[8]",
    "distill.epochs=2",
    "data.batch_size=32",
]


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scikit-learn's digits as image-shaped (N, 1, 8, 8) arrays, plain and compressed."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("npz")
    bunch = load_digits()
    inputs = (bunch.images[:, None] / 16.0).astype(np.float32)
    paths = {"plain": root / "digits.npz", "compressed": root / "digits_z.npz"}
    np.savez(paths["plain"], inputs=inputs, targets=bunch.target)
    np.savez_compressed(paths["compressed"], inputs=inputs, targets=bunch.target)
    return paths


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A table whose rare categories and classes first appear late in the file (a batch-wise fit
    must still find them, in the whole-table order)."""
    import datasets

    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(1)
    n = 300
    colour = rng.choice(["red", "green"], n).astype(object)
    colour[-3:] = "amber"  # only in the last batch
    label = rng.choice(["b", "c"], n).astype(object)
    label[-2:] = "a"
    data = {"x": rng.normal(5, 2, n), "k": rng.integers(0, 9, n), "colour": colour, "label": label}
    saved = datasets.Dataset.from_dict({k: list(v) for k, v in data.items()})
    paths = {"csv": root / "t.csv", "parquet": root / "t.parquet", "hf_disk": root / "t_saved"}
    saved.to_csv(str(paths["csv"]), index=False)
    saved.to_parquet(str(paths["parquet"]))
    saved.save_to_disk(str(paths["hf_disk"]))
    return paths


def test_an_uncompressed_npz_is_mapped_in_place(digits_npz: dict[str, Path]) -> None:
    loaded = DataSection(source="npz", path=digits_npz["plain"])
    mapped = DataSection(source="npz", path=digits_npz["plain"], memory_limit_mb=0)
    memory, disk = prepare_splits(loaded, 0), prepare_splits(mapped, 0)
    assert not memory.train.mapped and disk.train.mapped
    assert isinstance(disk.test.inputs, MappedInputs)
    assert disk.train.input_shape == memory.train.input_shape == (1, 8, 8)
    # the same samples in the same splits, read a batch at a time
    for name in ("train", "val", "test"):
        a, b = getattr(memory, name), getattr(disk, name)
        assert torch.equal(a.targets, b.targets)
        assert torch.equal(a.inputs, b.inputs[torch.arange(len(b))])
    batch = next(iter(make_loader(disk.train, 16, shuffle=False)))
    assert torch.equal(batch[0], memory.train.inputs[:16]) and torch.equal(
        batch[2], torch.arange(16)
    )


def test_mapped_inputs_are_standardised_as_they_are_read(digits_npz: dict[str, Path]) -> None:
    memory = prepare_splits(
        DataSection(source="npz", path=digits_npz["plain"], standardize=True), 0
    )
    disk = prepare_splits(
        DataSection(source="npz", path=digits_npz["plain"], standardize=True, memory_limit_mb=0), 0
    )
    mean, std = (torch.tensor(disk.train.preprocess[k]) for k in ("input_mean", "input_std"))
    assert torch.allclose(mean, torch.tensor(memory.train.preprocess["input_mean"]), atol=1e-6)
    assert torch.allclose(std, torch.tensor(memory.train.preprocess["input_std"]), atol=1e-5)
    assert torch.allclose(disk.val.inputs[:], memory.val.inputs, atol=1e-4)


def test_a_compressed_npz_over_the_limit_is_refused_in_one_line(
    digits_npz: dict[str, Path], tmp_path: Path
) -> None:
    result = stillroom_in_process(
        "distill", ROOT / "recipes" / "digits.yaml", "data.source=npz",
        f"data.path={digits_npz['compressed']}", "data.memory_limit_mb=0", "--out", tmp_path / "r",
    )  # fmt: skip
    assert_user_error(result, "np.savez (not np.savez_compressed)")
    assert not (tmp_path / "r").exists()


def test_a_run_on_mapped_data_gives_the_numbers_of_the_run_in_memory(
    digits_npz: dict[str, Path], tmp_path: Path
) -> None:
    """Image-shaped inputs are not rescaled, so the two runs must agree exactly."""
    figures = []
    for limit in ("2048", "0"):
        out = tmp_path / f"run_{limit}"
        result = stillroom_in_process(
            "distill", ROOT / "recipes" / "digits.yaml", *SMALL, "data.source=npz",
            f"data.path={digits_npz['plain']}", f"data.memory_limit_mb={limit}",
            "--out", out, "--no-progress", "--no-report",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        figures.append({m["role"]: m["metrics"] for m in summary["models"]})
    assert figures[0] == figures[1]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "hf_disk"])
def test_a_table_read_in_batches_encodes_like_the_whole_table(
    table: dict[str, Path], fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_batches, "BATCH_ROWS", 64)
    monkeypatch.setattr(table_batches, "CSV_BLOCK_BYTES", 2048)
    whole, encoding = read_table(table[fmt], label="label")
    batched, fitted = read_table(table[fmt], label="label", memory_limit_mb=0)
    assert batched.mapped and not whole.mapped
    assert fitted == encoding
    assert fitted.categories["colour"] == ["amber", "green", "red"]
    assert fitted.classes == ["a", "b", "c"]
    assert torch.equal(batched.targets, whole.targets)
    assert torch.equal(batched.inputs[:], whole.inputs)
    # a val/test file read with the training encoding, in batches too
    again, _ = read_table(table[fmt], label="label", encoding=encoding, memory_limit_mb=0)
    assert torch.equal(again.inputs[:], whole.inputs)


def test_an_image_folder_over_the_limit_is_decoded_into_a_scratch_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (6, 5), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    section = {"source": "images", "path": tmp_path / "imgs", "test_fraction": 0.25}
    memory = prepare_splits(DataSection(**section), 0)
    disk = prepare_splits(DataSection(**section, memory_limit_mb=0, scratch_dir=tmp_path), 0)
    assert disk.train.mapped and disk.train.input_shape == (1, 6, 5)
    assert torch.equal(disk.train.inputs[:], memory.train.inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # the scratch file has no name
