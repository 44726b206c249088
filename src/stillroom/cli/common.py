"""What the CLI commands share: consoles, options, the run-folder guard, the results table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from stillroom.measure import format_bytes
from stillroom.pipeline import RunResult
from stillroom.runs import claim_run_dir

console = Console()
err_console = Console(stderr=True)

OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="run folder to create")]
ForceOption = Annotated[bool, typer.Option("--force", help="replace an existing run folder")]
TrustFactoryOption = Annotated[
    bool,
    typer.Option(
        "--trust-factory",
        help="rebuild models made by a user factory (module:function) named in the folder: this "
        "imports and runs that module's code, so only for folders you trust",
    ),
]
ReportOption = Annotated[
    bool, typer.Option("--report/--no-report", help="write the HTML compression report at the end")
]
ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="show progress bars")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="recipe overrides as dotted key=value, e.g. distill.alpha=0.5"),
]


def fresh_run_dir(run_dir: Path, force: bool, kind: str = "run") -> None:
    """Refuse to reuse a folder unless --force, and then only a stillroom folder of `kind`."""
    claim_run_dir(run_dir, force, kind=kind)


def results_table(title: str, result: RunResult) -> Table:
    metric = result.metric
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    for column in (metric, "params", "size", "latency", "smaller/faster"):
        table.add_column(column, justify="right", no_wrap=True)
    teacher = result.rows["teacher"]
    for role, row in result.rows.items():
        table.add_row(
            role,
            f"{row[metric]:.4f}",
            f"{row['parameters']:,}",
            format_bytes(row["size_bytes"]),
            f"{row['latency_ms']:.3f} ms",
            f"{teacher['parameters'] / row['parameters']:.0f}x/"
            f"{teacher['latency_ms'] / row['latency_ms']:.1f}x",
        )
    gap = "n/a" if result.gap_closed is None else f"{result.gap_closed:.2f}"
    table.caption = f"test split; latency: CPU, batch 1, median\ngap closed = (kd - scratch) / (teacher - scratch) = {gap}"
    return table
