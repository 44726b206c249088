"""`stillroom export RUN_DIR`: the distilled student as safetensors, torch.export and ONNX files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from stillroom.cli.common import TrustFactoryOption, console
from stillroom.measure import format_bytes
from stillroom.models import trust_factories


def export_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="a finished classic run folder (e.g. runs/digits), or a model folder holding "
            "model.json (e.g. runs/sd/self_distilled/exits/exit1)"
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="export folder (default RUN_DIR/export)")
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
    run's test split for a run folder, on seeded random inputs for a bare model folder."""
    # onnx and torch.export load only for this command
    from stillroom.export import export_model_folder, export_run

    if trust_factory:
        trust_factories()

    # a model folder (any method's student, an exit, a generation), or a classic run folder
    is_model = (run_dir / "model.json").is_file() and not (run_dir / "config.yaml").is_file()
    if is_model:
        result = export_model_folder(run_dir, out, int8=int8, force=force)
    else:
        result = export_run(run_dir, out, int8=int8, force=force)
    manifest = result.manifest
    parity = manifest["parity"]
    table = Table(
        title=f"exported {run_dir if is_model else run_dir / manifest['source']['role']}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("format", "file", "size", "max |diff| vs PyTorch"):
        table.add_column(column, justify="left" if column in ("format", "file") else "right")
    files = manifest["files"]
    for fmt, name in (
        ("safetensors", "model.safetensors"),
        ("torch.export", "model.pt2"),
        ("onnx", "model.onnx"),
    ):
        check = parity["formats"][fmt.replace(".", "_")]
        table.add_row(fmt, name, format_bytes(files[name]["bytes"]), f"{check['max_abs_diff']:.2e}")
    int8_report = manifest["int8"]
    if int8_report is not None:
        table.add_row(
            "onnx int8",
            int8_report["file"],
            format_bytes(files[int8_report["file"]]["bytes"]),
            f"{int8_report['max_abs_diff']:.2e}",
        )
    table.caption = (
        f"parity on {parity['checked_samples']} {'random' if is_model else 'test'} inputs; allowed "
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
