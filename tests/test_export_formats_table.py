"""The FORMATS table: its names agree with FormatName and with `stillroom export --format`, each
row writes exactly its files and checks them with its runtime, and a bad choice or an export the
tracer cannot make is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
import typer
from torch import nn

from helpers import assert_user_error, stillroom_in_process
from stillroom.cli import app
from stillroom.cli.export_cmd import FormatChoice
from stillroom.errors import StillroomError
from stillroom.export import EXPORT_FILES, FORMATS, FormatName, export_model
from stillroom.export.formats import MANIFEST, ONNX_INT8, check_formats
from stillroom.models import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"kind": "mlp", "hidden": [8], "dropout": 0.0}


def test_names_agree_with_the_literal_and_the_cli() -> None:
    assert get_args(FormatName) == tuple(FORMATS)
    assert [choice.value for choice in FormatChoice] == list(FORMATS)
    command = typer.main.get_command(app).commands["export"]  # type: ignore[attr-defined]
    option = next(p for p in command.params if "--format" in p.opts)
    assert option.type_descriptor.annotation == list[FormatChoice] and option.multiple


def test_every_file_of_the_table_is_an_export_file() -> None:
    files = [name for row in FORMATS.values() for name in row.files]
    assert len(files) == len(set(files))  # no two rows write the same file
    assert set(EXPORT_FILES) == {*files, ONNX_INT8, MANIFEST}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_row_writes_its_files_and_checks_them(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, (1, 8, 8), 10)
    inputs = torch.rand(16, 1, 8, 8)
    result = export_model(model, inputs[:2], tmp_path / "out", check_inputs=inputs, formats=[name])
    manifest = result.manifest
    row = FORMATS[name]
    assert sorted(manifest["files"]) == sorted(row.files)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*row.files, MANIFEST])
    check = manifest["parity"]["formats"][name]
    assert list(manifest["parity"]["formats"]) == [name]
    assert check["passed"] and check["runtime"] == row.runtime
    assert (manifest["versions"]["onnx_opset"] is None) == (name != "onnx")


def test_cli_format_choice_writes_only_that_format(tmp_path: Path) -> None:
    folder = tmp_path / "student"
    torch.manual_seed(0)
    model = build_model(SPEC, (1, 8, 8), 10)
    save_model(model, SPEC, folder, input_shape=[1, 8, 8], num_outputs=10)
    out = tmp_path / "out"
    result = stillroom_in_process("export", folder, "--out", out, "--format", "torch_export")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt2"]
    assert "torch.export" in result.stdout and "model.onnx" not in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["parity"]["formats"]) == ["torch_export"]

    result = stillroom_in_process("export", folder, "--out", tmp_path / "o2", "--format", "tflite")
    assert result.returncode == 2 and "tflite" in result.stderr and "Traceback" not in result.stderr
    result = stillroom_in_process(
        "export", folder, "--out", tmp_path / "o3", "--format", "safetensors", "--int8"
    )
    assert_user_error(result, "--int8 quantises the ONNX file: add --format onnx")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_check_formats_orders_and_refuses() -> None:
    assert check_formats(["onnx", "safetensors"]) == ("safetensors", "onnx")
    with pytest.raises(StillroomError, match="unknown export format 'tflite'; available: "):
        check_formats(["tflite"])
    with pytest.raises(StillroomError, match="choose at least one export format"):
        check_formats([])


class DataDependent(nn.Module):
    """A branch on the values of its input: torch.export cannot trace one graph for it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def test_an_export_the_tracer_cannot_make_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        StillroomError, match=r"^torch\.export export of DataDependent failed \("
    ) as info:
        export_model(DataDependent(), torch.rand(4, 4), tmp_path / "out", formats=["torch_export"])
    assert "\n" not in str(info.value)
