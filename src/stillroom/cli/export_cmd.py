"""`stillroom export PATH`: a student as the files of FORMATS (safetensors, torch.export, ONNX),
each checked against PyTorch; a transformers student as ONNX beside its tokenizer."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from stillroom.cli.common import TrustFactoryOption, console
from stillroom.export.formats import FORMATS
from stillroom.measure import format_bytes
from stillroom.models import trust_factories

FormatChoice = enum.StrEnum("FormatChoice", {name: name for name in FORMATS})
"""--format takes a row of FORMATS: the choices are built from the table."""
INPUTS = {"run": "test inputs", "model": "random inputs", "transformers": "random token sequences"}
"""What the parity check ran on, by the kind of folder exported."""


def export_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="a finished classic run folder (e.g. runs/digits), a model folder holding "
            "model.json (e.g. runs/sd/self_distilled/exits/exit1), or a transformers folder "
            "holding config.json (e.g. runs/tiny_causal/student_kd)"
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="export folder (default RUN_DIR/export)")
    ] = None,
    formats: Annotated[
        list[FormatChoice] | None,
        typer.Option(
            "--format",
            "-f",
            help="a format to write (repeat for several); default: all of them, onnx for a "
            "transformers folder",
            show_default=False,
        ),
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="also write an int8 ONNX file and report its accuracy")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing export folder")
    ] = False,
    trust_factory: TrustFactoryOption = False,
) -> None:
    """Export a student (safetensors, ONNX, torch.export), each checked against PyTorch: on the
    run's test split for a run folder, on seeded random inputs for a bare model folder, on seeded
    random token ids for a transformers folder (ONNX, its tokenizer files beside it)."""
    # onnx and torch.export load only for this command
    from stillroom.export import export_path

    if trust_factory:
        trust_factories()

    kind, result = export_path(
        run_dir, out, [f.value for f in formats or []] or None, int8=int8, force=force
    )
    manifest = result.manifest
    parity = manifest["parity"]
    title = run_dir / manifest["source"]["role"] if kind == "run" else run_dir
    table = Table(title=f"exported {title}", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("format", "file", "size", "max |diff| vs PyTorch"):
        table.add_column(column, justify="left" if column in ("format", "file") else "right")
    files = manifest["files"]
    for fmt, check in parity["formats"].items():
        name = FORMATS[fmt].file
        table.add_row(
            FORMATS[fmt].label,
            name,
            format_bytes(files[name]["bytes"]),
            f"{check['max_abs_diff']:.2e}",
        )
    int8_report = manifest["int8"]
    if int8_report is not None:
        table.add_row(
            "onnx int8",
            int8_report["file"],
            format_bytes(files[int8_report["file"]]["bytes"]),
            f"{int8_report['max_abs_diff']:.2e}",
        )
    table.caption = (
        f"parity on {parity['checked_samples']} {INPUTS[kind]}; allowed "
        f"{parity['tolerance']['allowed']:.2e} (atol {parity['tolerance']['atol']:g} + rtol "
        f"{parity['tolerance']['rtol']:g} x max|output|)"
    )
    console.print(table)
    if int8_report is not None and "metric" in int8_report:
        metric = int8_report["metric"]
        console.print(
            f"test {metric}: float32 {int8_report['fp32']:.4f}, int8 {int8_report['int8']:.4f}"
        )
    # soft_wrap: paths stay on one line, so they can be copied from a narrow terminal
    console.print(
        f"export folder: {result.out_dir}\n  {result.out_dir / 'manifest.json'}", soft_wrap=True
    )
