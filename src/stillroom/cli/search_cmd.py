"""`stillroom search RECIPE --budget latency_ms=X`: the student's shape searched under a budget."""

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
from stillroom.cli.tune_cmd import ResumeOption, StorageOption
from stillroom.results import read_summary, terminal_table


def search_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe with a search: section")],
    overrides: OverridesArg = None,
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            help="the bound the chosen student must meet: params=N, latency_ms=X, size_kb=Y "
            "(KB of its ONNX file), or a share of the starting student's, e.g. latency_ms=50%",
        ),
    ] = "latency_ms=100%",
    trials: Annotated[
        int | None, typer.Option("--trials", help="candidates in all (default: search.trials)")
    ] = None,
    out: OutOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    storage: StorageOption = None,
    progress: ProgressOption = True,
    report: ReportOption = True,
    threads: ThreadsOption = None,
) -> None:
    """Search the student's shape (search.space: family, widths, depth) with NSGA-II for the
    Pareto front of validation metric against cost; retrain the best candidate inside --budget
    on the full schedule and compare it with the starting student on the test split."""
    from stillroom.report import build_report
    from stillroom.tune.search import search

    result = search(
        recipe,
        with_threads(overrides, threads),
        out,
        budget=budget,
        trials=trials,
        storage=storage,
        resume=resume,
        force=force,
        progress=progress,
    )
    page = build_report(result.run_dir) if report else None
    console.print(terminal_table(read_summary(result.run_dir)))
    console.print(
        f"run folder: {result.run_dir}\n  Pareto front: {result.run_dir / 'front.md'}\n"
        f"  chosen recipe: {result.chosen_recipe}",
        soft_wrap=True,
    )
    if page is not None:
        console.print(f"report: {page}", soft_wrap=True)
