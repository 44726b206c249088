"""User tables (CSV, JSON lines, Parquet, saved `datasets` folders) and class-folder images: what
they encode to, and the one-line errors a user gets for a bad file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from stillroom.data.images import read_image_folder
from stillroom.data.tables import SUFFIXES, TABLE_FORMATS, TableEncoding, read_table
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def png(path: Path, size: tuple[int, int] = (6, 4), mode: str = "L", value: int = 128) -> None:
    """An image of size (height, width) filled with `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 0, 255)
    Image.new(mode, (size[1], size[0]), color).save(path)


def test_formats_have_one_source():
    assert set(SUFFIXES.values()) | {"hf_disk"} == set(TABLE_FORMATS)


def test_csv_one_hot_text_column_and_text_label(tmp_path: Path):
    path = write_csv(
        tmp_path / "pets.csv",
        "weight,colour,kind\n4.0,red,dog\n2.5,blue,cat\n3.0,red,cat\n1.0,green,bird",
    )
    data, enc = read_table(path, label="kind")
    assert (data.task, data.num_outputs, data.name, len(data)) == ("classification", 3, "pets", 4)
    assert enc.classes == ["bird", "cat", "dog"]
    assert data.targets.tolist() == [2, 1, 1, 0]
    assert data.targets.dtype == torch.int64
    assert enc.categories == {"colour": ["blue", "green", "red"]}
    assert enc.feature_names == ["weight", "colour=blue", "colour=green", "colour=red"]
    assert enc.numeric == [True, False, False, False]
    assert data.inputs.dtype == torch.float32
    assert data.inputs.tolist() == [[4, 0, 0, 1], [2.5, 1, 0, 0], [3, 0, 0, 1], [1, 0, 1, 0]]
    assert TableEncoding.from_json(json.loads(json.dumps(enc.to_json()))) == enc


def test_task_inference_float_label_is_regression(tmp_path: Path):
    path = write_csv(tmp_path / "r.csv", "a,flag,y\n1,true,0.5\n2,false,1.0\n3,true,2.0")
    data, enc = read_table(path, label="y")
    assert (data.task, data.num_outputs, enc.classes) == ("regression", 1, None)
    assert data.targets.dtype == torch.float32
    assert data.targets.tolist() == [0.5, 1.0, 2.0]
    assert enc.categories == {"flag": ["False", "True"]}
    # integer labels classify, numerically ordered; the same float column can be forced
    ints = write_csv(tmp_path / "i.csv", "a,y\n1,10\n2,9\n3,10")
    data, enc = read_table(ints, label="y")
    assert (data.task, enc.classes, data.targets.tolist()) == (
        "classification",
        ["9", "10"],
        [1, 0, 1],
    )
    whole = write_csv(tmp_path / "w.csv", "a,y\n1,1.0\n2,2.0\n3,1.0")
    assert read_table(whole, label="y")[0].task == "regression"
    data, enc = read_table(whole, label="y", task="classification")
    assert (enc.classes, data.targets.tolist()) == (["1", "2"], [0, 1, 0])


def test_parquet_and_json_lines(tmp_path: Path):
    pq.write_table(
        pa.table({"x": [1.0, 2.0], "c": ["a", "b"], "y": [0, 1]}), tmp_path / "t.parquet"
    )
    data, enc = read_table(tmp_path / "t.parquet", label="y", inputs=["x"])
    assert (enc.input_columns, data.inputs.tolist(), data.targets.tolist()) == (
        ["x"],
        [[1], [2]],
        [0, 1],
    )
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"x": 1, "c": "a", "y": "no"}\n{"x": 2.5, "c": "b", "y": "yes"}\n')
    data, enc = read_table(lines, label="y")
    assert enc.feature_names == ["x", "c=a", "c=b"]
    assert (data.inputs[:, 0].tolist(), enc.classes) == ([1.0, 2.5], ["no", "yes"])


def test_saved_dataset_and_dataset_dict_split(tmp_path: Path):
    import datasets

    train = datasets.Dataset.from_dict(
        {"x": [0.0, 1.0, 2.0], "y": [0, 2, 1]},
        features=datasets.Features(
            {"x": datasets.Value("float32"), "y": datasets.ClassLabel(names=["lo", "mid", "hi"])}
        ),
    )
    train.save_to_disk(tmp_path / "one")
    data, enc = read_table(tmp_path / "one", label="y")
    assert (data.name, enc.classes, data.targets.tolist()) == (
        "one",
        ["lo", "mid", "hi"],
        [0, 2, 1],
    )
    test = train.select([1])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dd")
    assert len(read_table(tmp_path / "dd", label="y")[0]) == 3  # "train" by default
    data, _ = read_table(tmp_path / "dd", label="y", split="test", encoding=enc)
    assert data.targets.tolist() == [2]
    with pytest.raises(StillroomError, match="no split 'valid'; available: train, test"):
        read_table(tmp_path / "dd", label="y", split="valid")


def test_saved_dataset_with_image_column(tmp_path: Path):
    import datasets

    for i in range(3):
        png(tmp_path / f"{i}.png", size=(5, 7), value=60 * i)
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / f"{i}.png") for i in range(3)], "label": [1, 0, 1]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
        ),
    )
    ds.save_to_disk(tmp_path / "imgs")
    data, enc = read_table(tmp_path / "imgs", label="label")
    assert data.inputs.shape == (3, 1, 5, 7)
    assert data.inputs[2].max().item() == pytest.approx(120 / 255)
    assert (enc.image, enc.classes, data.targets.tolist()) == (
        {"size": [5, 7], "mode": "L"},
        ["a", "b"],
        [1, 0, 1],
    )
    resized, _ = read_table(tmp_path / "imgs", label="label", encoding=enc, image_size=(3, 3))
    assert resized.inputs.shape == (3, 1, 3, 3)


def test_encoding_reused_for_test_file(tmp_path: Path):
    train = write_csv(tmp_path / "train.csv", "n,c,y\n1,a,x\n2,b,y\n3,a,x")
    _, enc = read_table(train, label="y")
    # columns in another order, only one category present: still the training layout
    test = write_csv(tmp_path / "test.csv", "c,y,n\nb,y,5")
    data, same = read_table(test, label="y", encoding=enc)
    assert same is enc
    assert (data.inputs.tolist(), data.targets.tolist(), data.num_outputs) == ([[5, 0, 1]], [1], 2)
    unlabelled = write_csv(tmp_path / "new.csv", "n,c\n1,a")
    assert read_table(unlabelled, label="y", encoding=enc)[0].targets.tolist() == [IGNORE_INDEX]
    bad = write_csv(tmp_path / "bad.csv", "n,c,y\n1,a,x\n2,z,y")
    with pytest.raises(StillroomError, match=r"value 'z' of column 'c' in bad.csv \(row 2\)"):
        read_table(bad, label="y", encoding=enc)
    unseen = write_csv(tmp_path / "unseen.csv", "n,c,y\n1,a,w")
    with pytest.raises(StillroomError, match="class 'w' of column 'y'"):
        read_table(unseen, label="y", encoding=enc)


def test_column_errors(tmp_path: Path):
    path = write_csv(tmp_path / "t.csv", "height,label\n1,a\n2,b")
    with pytest.raises(StillroomError, match=r"no column 'lable' \(did you mean 'label'\?\)"):
        read_table(path, label="lable")
    with pytest.raises(StillroomError, match=r"no column 'hieght'.*columns: height, label"):
        read_table(path, label="label", inputs=["hieght"])
    mixed = write_csv(tmp_path / "m.csv", "x,y\n1,a\n2,b\nabc,a")
    with pytest.raises(
        StillroomError, match=r"column 'x' .*mixes numbers and text \(row 3: 'abc'\)"
    ):
        read_table(mixed, label="y")
    # a JSON field with numbers in most rows and text in one reads the same way
    (tmp_path / "m.jsonl").write_text('{"x": 1, "y": 0}\n{"x": 2, "y": 1}\n{"x": "abc", "y": 0}\n')
    with pytest.raises(
        StillroomError, match=r"column 'x' .*mixes numbers and text \(row 3: 'abc'\)"
    ):
        read_table(tmp_path / "m.jsonl", label="y")
    gap = write_csv(tmp_path / "g.csv", "x,c,y\n1,a,a\n,b,b\n3,a,a")
    with pytest.raises(StillroomError, match=r"column 'x' in g.csv has a missing .* in row 2"):
        read_table(gap, label="y")
    with pytest.raises(StillroomError, match=r"column 'c' in h.csv has a missing value in row 1"):
        read_table(write_csv(tmp_path / "h.csv", "c,y\n,a\nb,b"), label="y")
    with pytest.raises(StillroomError, match="has no rows"):
        read_table(write_csv(tmp_path / "e.csv", "x,y"), label="y")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(StillroomError, match="has no rows"):
        read_table(tmp_path / "e.jsonl", label="y")


def test_missing_labels_become_unlabelled(tmp_path: Path):
    classes = write_csv(tmp_path / "c.csv", "x,y\n1,a\n2,\n3,b")
    data, _ = read_table(classes, label="y")
    assert data.targets.tolist() == [0, IGNORE_INDEX, 1]
    ints = write_csv(tmp_path / "i.csv", "x,y\n1,3\n2,\n3,4")
    assert read_table(ints, label="y")[0].targets.tolist() == [0, IGNORE_INDEX, 1]
    values = write_csv(tmp_path / "r.csv", "x,y\n1,0.5\n2,\n3,1.5")
    targets = read_table(values, label="y")[0].targets.tolist()
    assert targets[0] == 0.5 and math.isnan(targets[1]) and targets[2] == 1.5


def test_nothing_written_to_huggingface_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    # datasets read those at import, so its resolved paths are redirected too
    for name in ("HF_DATASETS_CACHE", "HF_MODULES_CACHE", "DOWNLOADED_DATASETS_PATH"):
        monkeypatch.setattr(datasets.config, name, cache / name)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(cache))
    rows = {"x": [1.0, 2.0], "y": ["a", "b"]}
    write_csv(tmp_path / "t.csv", "x,y\n1,a\n2,b")
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"x": x, "y": y}) + "\n" for x, y in zip(*rows.values(), strict=True))
    )
    pq.write_table(pa.table(rows), tmp_path / "t.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dd")
    for name in ("t.csv", "t.jsonl", "t.parquet", "dd"):
        assert read_table(tmp_path / name, label="y")[0].targets.tolist() == [0, 1]
    assert not cache.exists() or not any(cache.rglob("*"))


def test_image_folder_gray_and_rgb(tmp_path: Path):
    png(tmp_path / "gray" / "zero" / "a.png", value=0)
    png(tmp_path / "gray" / "one" / "b.png", value=255)
    png(tmp_path / "gray" / "one" / "c.png", value=51)
    data, settings = read_image_folder(tmp_path / "gray")
    assert settings == {"size": [6, 4], "mode": "L", "classes": ["one", "zero"], "images": 3}
    assert (data.inputs.shape, data.inputs.dtype) == ((3, 1, 6, 4), torch.float32)
    assert data.inputs.amax(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert (data.targets.tolist(), data.task, data.num_outputs) == ([0, 0, 1], "classification", 2)
    png(tmp_path / "gray" / "zero" / "d.png", mode="RGB")  # one colour image: all become RGB
    data, settings = read_image_folder(tmp_path / "gray")
    assert (settings["mode"], data.inputs.shape) == ("RGB", (4, 3, 6, 4))
    assert data.inputs[3, :, 0, 0].tolist() == pytest.approx([128 / 255, 0.0, 1.0])


def test_image_sizes_must_match_or_resize(tmp_path: Path):
    png(tmp_path / "a" / "x.png", size=(28, 28))
    png(tmp_path / "b" / "y.png", size=(32, 30))
    with pytest.raises(StillroomError, match=r"a/x.png 28x28, b/y.png 32x30.*data.image_size"):
        read_image_folder(tmp_path)
    data, settings = read_image_folder(tmp_path, size=(8, 10), mode="RGB")
    assert (data.inputs.shape, settings["size"]) == ((2, 3, 8, 10), [8, 10])
    assert np.allclose(data.inputs[:, 0].numpy(), 128 / 255)


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(StillroomError, match="does not exist"):
        read_image_folder(tmp_path / "nowhere")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(StillroomError, match=r"no images under .*\(read: .png, .jpg"):
        read_image_folder(tmp_path)
    png(tmp_path / "dog" / "a.png")
    with pytest.raises(StillroomError, match=r"class folder .*cat has no images"):
        read_image_folder(tmp_path)
    (tmp_path / "cat" / "x.png").write_bytes(b"not really a png")
    with pytest.raises(
        StillroomError, match=r"cannot read image cat/x.png \(.*\); remove or replace"
    ):
        read_image_folder(tmp_path)
    with pytest.raises(
        StillroomError, match=r"class folder 'cat' .* not one of the training classes"
    ):
        read_image_folder(tmp_path, classes=["dog"])
    with pytest.raises(StillroomError, match="is a file"):
        read_image_folder(tmp_path / "dog" / "a.png")
    png(tmp_path / "flat" / "a.png")
    with pytest.raises(StillroomError, match="has images but no class subfolders"):
        read_image_folder(tmp_path / "flat")
