"""Bring your own data and models, through the real CLI (in-process): a PNG class folder, CSV
(classification and regression, exported in the user's units), Parquet, a save_to_disk folder,
a factory model from the test's own module, an ONNX teacher, a scikit-learn teacher; and the
one-line errors for bad input, with nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, assert_user_error, stillroom, stillroom_in_process

RECIPE = ROOT / "recipes" / "digits.yaml"
SMALL = [
    "teacher.kind=mlp",
    "teacher.hidden=[32]",
    "teacher.train.epochs=3",
    "student.hidden=[8]",
    "distill.epochs=3",
    "data.batch_size=32",
]


def distill(out: Path, *overrides: str, recipe: Path = RECIPE, report: bool = False):
    flags = ["--no-progress"] + ([] if report else ["--no-report"])
    return stillroom_in_process("distill", recipe, *SMALL, *overrides, "--out", out, *flags)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-class table (two informative numeric features, one text column, text labels) and a
    regression table in large units, as CSV, Parquet and a save_to_disk folder."""
    import datasets

    root = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(0)
    n = 240
    x1, x2 = rng.normal(50, 10, n), rng.normal(-3, 2, n)
    colour = rng.choice(["red", "green", "blue"], n)
    label = np.where((x1 - 50) / 10 + (x2 + 3) / 2 + (colour == "red") > 0.3, "yes", "no")
    target = 1000 + 40 * x1 - 300 * x2 + rng.normal(0, 20, n)  # in the user's (large) units
    columns = {"size": x1, "depth": x2, "colour": colour, "label": label, "price": target}
    table = datasets.Dataset.from_dict({k: list(v) for k, v in columns.items()})
    paths = {
        "csv": root / "shop.csv",
        "parquet": root / "shop.parquet",
        "hf_disk": root / "shop_saved",
    }
    table.to_csv(str(paths["csv"]), index=False)
    table.to_parquet(str(paths["parquet"]))
    table.save_to_disk(str(paths["hf_disk"]))
    return paths


def test_csv_classification_with_a_text_column(tables: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    csv = tables["csv"]
    result = distill(
        out, "data.source=csv", f"data.path={csv}", "data.inputs=[size, depth, colour]", report=True
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "data.json").read_text())
    assert record["encoding"]["classes"] == ["no", "yes"]
    assert record["encoding"]["feature_names"] == [
        "size",
        "depth",
        "colour=blue",
        "colour=green",
        "colour=red",
    ]
    # numeric features standardised with the training split's statistics; one-hot left as is
    pre = record["preprocess"]
    assert pre["input_std"][2:] == [1.0, 1.0, 1.0] and 8 < pre["input_std"][0] < 12
    assert sum(record["samples"].values()) == 240
    assert results(out)["models"]["teacher"]["accuracy"] > 0.8
    assert (out / "report" / "report.html").is_file()
    meta = json.loads((out / "student_kd" / "model.json").read_text())
    assert meta["preprocess"] == pre  # every model carries its data's standardisation


def test_csv_regression_student_exported_in_the_users_units(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime

    out = tmp_path / "run"
    overrides = ["data.source=csv", f"data.path={tables['csv']}", "data.label=price"]
    result = distill(
        out,
        *overrides,
        "data.inputs=[size, depth]",
        "distill.loss=regression",
        "teacher.train.epochs=40",
        "distill.epochs=40",
    )
    assert result.returncode == 0, result.stderr
    # torch.export is tested in test_export.py: here the units matter, read through two runtimes
    exported = stillroom_in_process("export", out, "-f", "onnx", "-f", "safetensors")
    assert exported.returncode == 0, exported.stderr
    import datasets

    table = datasets.Dataset.from_csv(str(tables["csv"]), keep_in_memory=True)
    raw = np.stack([table["size"], table["depth"]], axis=1).astype(np.float32)
    truth = np.asarray(table["price"])
    session = onnxruntime.InferenceSession(str(out / "export" / "model.onnx"))
    predicted = session.run(None, {session.get_inputs()[0].name: raw})[0].ravel()
    # predictions in the target's own units (mean ~1900, std ~600), not standardised ones
    assert abs(predicted.mean() - truth.mean()) < 0.25 * truth.std()
    assert np.sqrt(((predicted - truth) ** 2).mean()) < 0.6 * truth.std()
    from stillroom.models import load_model

    model, _ = load_model(out / "export")
    torch_pred = model(torch.tensor(raw[:5])).detach().numpy().ravel()
    np.testing.assert_allclose(torch_pred, predicted[:5], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("source", ["parquet", "hf_disk"])
def test_parquet_and_save_to_disk_folders(
    source: str, tables: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = distill(
        out,
        f"data.source={source}",
        f"data.path={tables[source]}",
        "data.inputs=[size, depth, colour]",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "data.json").read_text())["source"] == source
    assert results(out)["models"]["teacher"]["accuracy"] > 0.8


def test_own_test_file_is_used_as_given(tables: dict[str, Path], tmp_path: Path) -> None:
    import datasets

    table = datasets.Dataset.from_csv(str(tables["csv"]), keep_in_memory=True)
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    table.select(range(200)).to_csv(str(train), index=False)
    table.select(range(200, 240)).to_csv(str(test), index=False)
    out = tmp_path / "run"
    result = distill(
        out,
        "data.source=csv",
        f"data.path={train}",
        f"data.test_path={test}",
        "data.inputs=[size, depth, colour]",
    )
    assert result.returncode == 0, result.stderr
    samples = json.loads((out / "data.json").read_text())["samples"]
    assert samples["test"] == 40 and samples["train"] + samples["val"] == 200


def draw_digit_folder(root: Path, per_class: int = 30) -> Path:
    """Class folders of 12x12 grayscale PNGs: a bar that is horizontal, vertical or diagonal."""
    rng = np.random.default_rng(0)
    for name in ("horizontal", "vertical", "diagonal"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (12, 12)).astype(np.uint8)
            k = rng.integers(2, 10)
            if name == "horizontal":
                image[k, 1:11] = 255
            elif name == "vertical":
                image[1:11, k] = 255
            else:
                np.fill_diagonal(image, 255)
            Image.fromarray(image, mode="L").save(root / name / f"{i}.png")
    return root


def test_png_class_folders(tmp_path: Path) -> None:
    folder = draw_digit_folder(tmp_path / "bars")
    out = tmp_path / "run"
    result = distill(
        out, "data.source=images", f"data.path={folder}", "teacher.kind=cnn", "teacher.channels=[4]"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "data.json").read_text())
    assert record["images"]["classes"] == ["diagonal", "horizontal", "vertical"]
    assert record["images"]["size"] == [12, 12] and record["images"]["mode"] == "L"
    meta = json.loads((out / "teacher" / "model.json").read_text())
    assert meta["input_shape"] == [1, 12, 12] and meta["num_outputs"] == 3
    assert results(out)["models"]["teacher"]["accuracy"] > 0.6


FACTORY_MODULE = """
from torch import nn


def build_student(width, input_shape, num_outputs):
    features = 1
    for d in input_shape:
        features *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_outputs))


def broken(width):
    raise RuntimeError("no GPU here")


def not_a_module():
    return 42
"""


@pytest.fixture
def factory_recipe(tmp_path: Path) -> Path:
    """A recipe folder holding the user's module (found beside the recipe)."""
    folder = tmp_path / "project"
    folder.mkdir()
    module = f"user_models_{tmp_path.name}".replace("-", "_")
    (folder / f"{module}.py").write_text(FACTORY_MODULE)
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"name: own\nstudent:\n  kind: factory\n  factory: {module}:build_student\n"
        "  kwargs: {width: 12}\n"
    )
    yield recipe
    for name in [m for m in sys.modules if m.startswith("user_models_")]:
        del sys.modules[name]


def test_factory_student_from_the_users_module(factory_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = distill(out, recipe=factory_recipe)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "student_kd" / "model.json").read_text())
    assert meta["spec"]["kind"] == "factory" and meta["spec"]["kwargs"] == {"width": 12}
    assert results(out)["models"]["student_kd"]["parameters"] == 64 * 12 + 12 + 12 * 10 + 10
    # a received run folder never imports the factory unless asked on the command line
    refused = stillroom("export", out)
    assert_user_error(refused, "pass --trust-factory")
    assert not (out / "export").exists()
    # the refusal above ran in a process of its own; the trusted export needs none
    trusted = stillroom_in_process("export", out, "--trust-factory", "-f", "safetensors")
    assert trusted.returncode == 0, trusted.stderr


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("broken", "raised RuntimeError: no GPU here"),
        ("not_a_module", "returned a int, not a torch nn.Module"),
        ("missing_fn", "has no 'missing_fn'"),
    ],
)
def test_bad_factories_are_one_line(
    factory_recipe: Path, tmp_path: Path, factory: str, fragment: str
) -> None:
    text = factory_recipe.read_text().replace(":build_student", f":{factory}")
    if factory == "not_a_module":
        text = text.replace("  kwargs: {width: 12}\n", "")
    factory_recipe.write_text(text)
    out = tmp_path / "run"
    assert_user_error(distill(out, recipe=factory_recipe), fragment)
    assert not out.exists()


@pytest.fixture(scope="module")
def onnx_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits teacher trained in plain PyTorch elsewhere and handed over as ONNX."""
    from stillroom.data import load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(data.inputs), data.targets).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    torch.onnx.export(
        net.eval(),
        (data.inputs[:2],),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return path


def test_onnx_teacher(onnx_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = distill(out, "teacher.kind=onnx", f"teacher.path={onnx_teacher}", "baseline=false")
    assert result.returncode == 0, result.stderr
    rows = results(out)["models"]
    assert rows["teacher"]["accuracy"] > 0.95  # trained on every digit, test split included
    assert rows["teacher"]["parameters"] == 64 * 64 + 64 + 64 * 10 + 10
    assert rows["student_kd"]["teacher_agreement"] > 0.5


def test_onnx_teacher_that_does_not_fit_the_data(onnx_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = distill(
        out,
        "data.source=diabetes",
        "teacher.kind=onnx",
        f"teacher.path={onnx_teacher}",
        "distill.loss=regression",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_sklearn_teacher_gradient_boosting_to_mlp(tables: dict[str, Path], tmp_path: Path) -> None:
    import datasets
    import skops.io
    from sklearn.ensemble import GradientBoostingClassifier

    table = datasets.Dataset.from_csv(str(tables["csv"]), keep_in_memory=True)
    features = np.stack([table["size"], table["depth"]], axis=1)
    booster = GradientBoostingClassifier(n_estimators=20, random_state=0)
    booster.fit(features, table["label"])  # the user's model: raw features, text labels
    path = tmp_path / "booster.skops"
    skops.io.dump(booster, path)
    out = tmp_path / "run"
    result = distill(
        out,
        "data.source=csv",
        f"data.path={tables['csv']}",
        "data.inputs=[size, depth]",
        "teacher.kind=sklearn",
        f"teacher.path={path}",
    )
    assert result.returncode == 0, result.stderr
    rows = results(out)["models"]
    # the teacher in the table is the booster itself: its accuracy on the run's own test rows
    from stillroom.config import load_recipe
    from stillroom.data import to_user_units
    from stillroom.pipeline import prepare_data

    test = to_user_units(prepare_data(load_recipe(out / "config.yaml"))[0].test)
    expected = (
        booster.predict(test.inputs.numpy()) == np.array(["no", "yes"])[test.targets.numpy()]
    ).mean()
    assert rows["teacher"]["accuracy"] == pytest.approx(expected)
    assert rows["teacher"]["parameters"] > 0


@pytest.mark.parametrize(
    ("make", "overrides", "fragment"),
    [
        ("empty_folder", ["data.source=images"], "no class subfolders"),
        ("bad_image", ["data.source=images"], "cannot read image"),
        ("csv", ["data.source=csv", "data.label=labl"], "did you mean 'label'"),
        ("mixed", ["data.source=csv"], "mixes numbers and text"),
        (
            "csv",
            ["data.source=csv", "student.kind=onnx", "student.path=x.onnx"],
            "a student must train",
        ),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(
    tmp_path: Path, tables: dict[str, Path], make: str, overrides: list[str], fragment: str
) -> None:
    if make == "empty_folder":
        path = tmp_path / "nothing"
        path.mkdir()
    elif make == "bad_image":
        path = draw_digit_folder(tmp_path / "bars", per_class=3)
        (path / "vertical" / "broken.png").write_bytes(b"not a png at all")
    elif make == "mixed":
        path = tmp_path / "mixed.csv"
        path.write_text("a,label\n1,x\n2,y\nthree,x\n4,y\n")
    else:
        path = tables["csv"]
    out = tmp_path / "run"
    assert_user_error(distill(out, *overrides, f"data.path={path}"), fragment)
    assert not out.exists()
