"""`stillroom tune RECIPE --trials N` and `stillroom search RECIPE --budget params=N`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillroom.cli.common import (
    ForceOption,
    OutOption,
    OverridesArg,
    ProgressOption,
    ReportOption,
    ThreadsOption,
    console,
    with_threads,
)
from stillroom.results import read_summary, terminal_table

ResumeOption = Annotated[
    bool,
    typer.Option(
        "--resume", help="continue the study in --out (finished trials are kept)", metavar=""
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage URL for the study (default: sqlite in the run folder), e.g. "
        "sqlite:///studies.db or postgresql://...",
    ),
]
WorkersOption = Annotated[
    int, typer.Option("--workers", help="trial processes running against the one storage")
]


def tune_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe with a tune: section")],
    overrides: OverridesArg = None,
    trials: Annotated[
        int | None, typer.Option("--trials", help="trials in all (default: tune.trials)")
    ] = None,
    out: OutOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    workers: WorkersOption = 1,
    storage: StorageOption = None,
    progress: ProgressOption = True,
    report: ReportOption = True,
    threads: ThreadsOption = None,
) -> None:
    """Tune the recipe's tune.space (T, alpha, lr, any dotted field) with Optuna on the validation
    split, then compare the best recipe with the starting one on the test split over seeds."""
    from stillroom.report import build_report
    from stillroom.tune import tune

    result = tune(
        recipe,
        with_threads(overrides, threads),
        out,
        trials=trials,
        workers=workers,
        storage=storage,
        resume=resume,
        force=force,
        progress=progress,
    )
    page = build_report(result.run_dir) if report else None
    console.print(terminal_table(read_summary(result.run_dir)))
    console.print(
        f"run folder: {result.run_dir}\n  best recipe: {result.best_recipe}", soft_wrap=True
    )
    if page is not None:
        console.print(f"report: {page}", soft_wrap=True)
