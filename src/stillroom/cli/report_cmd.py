"""`stillroom report RUN_DIR`: the compression report (HTML, PNG figures, report.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillroom.cli.common import TrustFactoryOption, console
from stillroom.models import trust_factories


def report_command(
    run_dir: Annotated[
        Path, typer.Argument(help="a finished run folder of any method, e.g. runs/digits")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="report folder (default RUN_DIR/report)")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads while timing (default: one per core); 1 is steadier on a busy machine",
        ),
    ] = None,
    trust_factory: TrustFactoryOption = False,
) -> None:
    """Write report.html, report.json and PNGs: a classic run's models measured again on this
    machine; any other method's run from the numbers its summary.json holds."""
    from stillroom.report import Timing, build_report  # matplotlib loads only for this command

    if trust_factory:
        trust_factories()
    path = build_report(run_dir, out, Timing(threads=threads))
    # soft_wrap: paths stay on one line, so they can be copied from a narrow terminal
    console.print(f"report: {path}\n  numbers: {path.with_name('report.json')}", soft_wrap=True)
