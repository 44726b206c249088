"""`kind: hf`: a local transformers image classifier folder (a tiny ViT built from a config here,
nothing downloaded) as the teacher or the student of a classic run, through the real CLI
(in-process); its model folder rebuilding without the original folder; its export; the one-line
errors for a folder that does not fit the data, with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.config import MODEL_KINDS, ModelSection, load_recipe
from stillroom.errors import StillroomError
from stillroom.export import open_run
from stillroom.models import MODELS, build_model, load_model, save_model
from stillroom.models.hf import HFImageClassifier

RECIPE = ROOT / "recipes" / "digits.yaml"
# a run needs a trained model, not a good one: one epoch of each phase, large batches
SMALL = [
    "teacher.train.epochs=1",
    "distill.epochs=1",
    "data.batch_size=256",
    "--no-progress",
    "--no-report",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_vit(folder: Path, weights: bool = True, **overrides) -> Path:
    """A tiny ViT image classifier for the digits' 1x8x8 images, saved as save_pretrained does
    (weights=False: config.json alone)."""
    from transformers import ViTConfig, ViTForImageClassification

    settings = dict(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=32,
        num_labels=10,
    )
    config = ViTConfig(**{**settings, **overrides})
    if weights:
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vit(tmp_path_factory.mktemp("hf") / "vit")


def test_recipe_model_kinds_are_rows_of_the_models_table() -> None:
    assert set(MODEL_KINDS) <= set(MODELS)
    assert get_args(ModelSection.model_fields["kind"].annotation) == MODEL_KINDS


def test_an_hf_kind_needs_its_folder() -> None:
    with pytest.raises(StillroomError, match="kind 'hf' needs path: the transformers folder"):
        load_recipe(None, ["student.kind=hf"])


def test_model_folder_rebuilds_without_the_original_folder(vit: Path, tmp_path: Path) -> None:
    source = shutil.copytree(vit, tmp_path / "vit")
    model = build_model({"kind": "hf", "path": str(source)}, (1, 8, 8), 10)
    assert isinstance(model, HFImageClassifier)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (5, 10)
    # the folder's weights, not a fresh initialisation
    from transformers import ViTForImageClassification

    reference = ViTForImageClassification.from_pretrained(source).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(pixel_values=x).logits)

    save_model(
        model,
        {"kind": "hf", "path": str(source)},
        tmp_path / "saved",
        input_shape=[1, 8, 8],
        num_outputs=10,
    )
    shutil.rmtree(source)
    spec = json.loads((tmp_path / "saved" / "model.json").read_text())["spec"]
    assert spec["kind"] == "hf" and spec["config"]["model_type"] == "vit" and "path" not in spec
    rebuilt, _ = load_model(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), logits, rtol=0, atol=0)


def test_a_folder_without_weights_builds_a_fresh_seeded_model(tmp_path: Path) -> None:
    folder = write_vit(tmp_path / "config_only", weights=False)
    assert not list(folder.glob("*.safetensors"))
    spec, x = {"kind": "hf", "path": str(folder)}, torch.rand(3, 1, 8, 8)
    outputs = []
    for _ in range(2):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(build_model(spec, (1, 8, 8), 10).eval()(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_pickled_weights_are_refused(vit: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(vit / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(StillroomError, match="holds only pickled weights"):
        build_model({"kind": "hf", "path": str(folder)}, (1, 8, 8), 10)


@pytest.fixture(scope="module")
def hf_run(vit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classic run with both roles hf: the teacher fine-tuned from the ViT folder's weights,
    the student built from a config.json alone; both folders are deleted after it."""
    root = tmp_path_factory.mktemp("hf_run")
    teacher = shutil.copytree(vit, root / "teacher_vit")
    student = write_vit(root / "student_vit", weights=False, hidden_size=8, intermediate_size=16)
    out = root / "run"
    overrides = [
        "teacher.kind=hf",
        f"teacher.path={teacher}",
        "student.kind=hf",
        f"student.path={student}",
        "baseline=false",
    ]
    result = stillroom_in_process("distill", RECIPE, *overrides, *SMALL, "--out", out)
    assert result.returncode == 0, result.stderr
    shutil.rmtree(teacher)
    shutil.rmtree(student)  # from here on the run folder alone rebuilds both models
    return out


def test_hf_teacher_and_student_run(vit: Path, hf_run: Path) -> None:
    models = json.loads((hf_run / "results.json").read_text())["models"]
    assert set(models) == {"teacher", "student_kd"}
    teacher, meta = load_model(hf_run / "teacher")
    student, student_meta = load_model(hf_run / "student_kd")
    assert meta["spec"]["kind"] == "hf" and len(meta["spec"]["config"]["id2label"]) == 10
    assert student_meta["spec"]["config"]["hidden_size"] == 8
    for row, model in ((models["teacher"], teacher), (models["student_kd"], student)):
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
    assert models["student_kd"]["parameters"] < models["teacher"]["parameters"]
    # the teacher trained here, from the folder's weights: they moved, and not from a fresh init
    key = "model.classifier.weight"
    initial = build_model({"kind": "hf", "path": str(vit)}, (1, 8, 8), 10).state_dict()[key]
    torch.manual_seed(5)
    fresh = build_model({"kind": "hf", "config": meta["spec"]["config"]}, (1, 8, 8), 10)
    trained = teacher.state_dict()[key]
    assert not torch.equal(trained, initial)
    assert (trained - initial).abs().max() < 0.5 * (fresh.state_dict()[key] - initial).abs().max()
    soft = load_file(str(hf_run / "soft_targets.safetensors"))
    assert next(iter(soft.values())).shape[1:] == (10,)
    summary = (hf_run / "summary.json").read_text()
    assert "hf teacher_vit" in summary and "hf student_vit" in summary


def _export(run: Path, *formats: str) -> dict:
    flags = [f"--format={f}" for f in formats]
    result = stillroom_in_process("export", run, *flags, "--out", run / f"export_{formats[-1]}")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / f"export_{formats[-1]}" / "manifest.json").read_text())
    assert manifest["passed"]
    for fmt in formats:
        check = manifest["parity"]["formats"][fmt]
        assert check["passed"] and check["max_abs_diff"] <= check["allowed"], fmt
    return manifest


def test_hf_student_exports_with_torch_export(hf_run: Path) -> None:
    manifest = _export(hf_run, "safetensors", "torch_export")
    assert manifest["parity"]["checked_samples"] == len(open_run(hf_run).test)
    _, meta = load_model(hf_run / "export_torch_export")
    assert meta["spec"]["kind"] == "hf"


@pytest.mark.slow  # ~10 s of CPU, most of it the ONNX exporter; test_export covers the machinery
def test_hf_student_exports_to_onnx(hf_run: Path) -> None:
    _export(hf_run, "onnx")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"num_labels": 3},
            "has num_labels 3 (config.json) but the data has 10 outputs; set new_head: true",
        ),
        (
            {"image_size": 16},
            "cannot take the data's images of shape (1, 8, 8) (Input image size (8*8) doesn't "
            "match model (16*16).); its config.json has image_size 16",
        ),
        (
            {"num_channels": 3},
            "takes images with 3 channel(s) (config.json num_channels) but the data's have 1",
        ),
    ],
    ids=["num_labels", "image_size", "channels"],
)
def test_a_folder_that_does_not_fit_the_data_is_one_line_and_writes_nothing(
    tmp_path: Path, overrides: dict, fragment: str
) -> None:
    folder = write_vit(tmp_path / "bad", weights=False, **overrides)
    out = tmp_path / "run"
    for role in ("teacher", "student"):
        result = stillroom_in_process(
            "distill", RECIPE, f"{role}.kind=hf", f"{role}.path={folder}", *SMALL, "--out", out
        )
        assert_user_error(result, fragment)
        assert not out.exists()


def test_a_model_json_of_an_unknown_architecture_is_one_line() -> None:
    spec = {"kind": "hf", "config": {"model_type": "not_a_transformers_model"}}
    with pytest.raises(StillroomError, match="cannot rebuild the hf model of model_type"):
        build_model(spec, (1, 8, 8), 10)
