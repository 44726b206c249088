"""`kind: hf` on the user's own labels and pixels: a fresh head sized for the data (`new_head`),
and the folder's image processor settings (resize, mean/std) applied inside the model, kept in
model.json, through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.models import build_model, load_model, save_model
from test_hf_models import SMALL, write_vit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' ViT for 16x16 gray images with 5 labels and its image processor."""
    from transformers import ViTImageProcessor

    folder = write_vit(tmp_path_factory.mktemp("hf") / "vit16", image_size=16, num_labels=5)
    processor = ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.25], do_resize=True
    )
    processor.save_pretrained(folder)
    return folder


def test_a_new_head_fits_the_data_and_keeps_the_backbone(pretrained: Path) -> None:
    from transformers import ViTForImageClassification

    model = build_model({"kind": "hf", "path": str(pretrained), "new_head": True}, (1, 8, 8), 10)
    assert model.model.config.num_labels == 10
    assert model.model.classifier.out_features == 10
    source = ViTForImageClassification.from_pretrained(pretrained)
    for name, tensor in source.vit.state_dict().items():
        assert torch.equal(model.model.vit.state_dict()[name], tensor), name


def test_without_new_head_the_mismatch_says_how_to_fix_it(pretrained: Path, tmp_path: Path) -> None:
    result = stillroom_in_process(
        "distill", ROOT / "recipes" / "digits.yaml", "teacher.kind=hf",
        f"teacher.path={pretrained}", *SMALL, "--out", tmp_path / "run",
    )  # fmt: skip
    assert_user_error(result, "set new_head: true in its section")
    assert not (tmp_path / "run").exists()


def test_the_image_processor_resizes_and_normalises_inside_the_model(
    pretrained: Path, tmp_path: Path
) -> None:
    spec = {"kind": "hf", "path": str(pretrained), "new_head": True}
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), 10).eval()
    x = torch.rand(4, 1, 8, 8)
    expected_pixels = (F.interpolate(x, size=(16, 16), mode="bilinear") - 0.5) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model(pixel_values=expected_pixels).logits)
    save_model(model, spec, tmp_path / "saved", input_shape=[1, 8, 8], num_outputs=10)
    saved = json.loads((tmp_path / "saved" / "model.json").read_text())["spec"]
    assert saved["pixels"] == {"size": [16, 16], "mean": [0.5], "std": [0.25]}
    rebuilt, _ = load_model(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)


def test_a_pretrained_teacher_with_a_new_head_distils_through_the_cli(
    pretrained: Path, tmp_path: Path
) -> None:
    teacher = shutil.copytree(pretrained, tmp_path / "teacher")
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill", ROOT / "recipes" / "digits.yaml", "teacher.kind=hf", f"teacher.path={teacher}",
        "teacher.new_head=true", "baseline=false", *SMALL, "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shutil.rmtree(teacher)  # the run folder alone rebuilds it, head and pixels included
    model, meta = load_model(out / "teacher")
    assert meta["spec"]["pixels"]["size"] == [16, 16] and meta["num_outputs"] == 10
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)
