"""`stillroom demo`, `stillroom distill RECIPE`, `stillroom check RECIPE`."""

from __future__ import annotations

import time
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
    TrustRemoteCodeOption,
    console,
    fresh_run_dir,
    with_threads,
)
from stillroom.config import dump_recipe
from stillroom.dist import process_run_dir, rank
from stillroom.results import read_summary, terminal_table
from stillroom.runs import release


def demo(
    overrides: OverridesArg = None,
    out: OutOption = None,
    seed: Annotated[int, typer.Option(help="seed for data splits, initialisation and order")] = 0,
    force: ForceOption = False,
    progress: ProgressOption = True,
    report: ReportOption = True,
    threads: ThreadsOption = None,
) -> None:
    """Distil a CNN into a 31x smaller MLP on built-in digits, with all labels and with 5% of them."""
    from stillroom.demo import demo_summaries, run_demo, write_demo_md
    from stillroom.report import build_report, write_index

    run_dir = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    fresh_run_dir(run_dir, force, kind="demo")
    started = time.perf_counter()
    result = run_demo(
        run_dir, seed=seed, progress=progress, overrides=with_threads(overrides, threads)
    )
    reports = {name: build_report(run_dir / name) for name in result.settings} if report else {}
    summaries = demo_summaries(run_dir)  # after the reports: their latency is the one shown
    if reports:
        write_demo_md(run_dir)
    for summary in summaries.values():
        console.print(terminal_table(summary))
        console.print()
    console.print(f"finished in {time.perf_counter() - started:.0f} s; run folder: {run_dir}")
    for name in result.settings:
        console.print(
            f"  {run_dir / name / 'results.md'}  (plots: curves.png, size_vs_metric.png)",
            soft_wrap=True,
        )
    if reports:
        index = write_index(run_dir, "stillroom demo", summaries, reports)
        console.print(f"reports: {index}", soft_wrap=True)
        for name, path in reports.items():
            console.print(f"  {name}: {path}", soft_wrap=True)


def distill_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/digits.yaml")],
    overrides: OverridesArg = None,
    out: OutOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in --out", metavar="")
    ] = False,
    force: ForceOption = False,
    progress: ProgressOption = True,
    report: ReportOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Run a recipe (its `method:` picks the workflow; see `stillroom methods`)."""
    from stillroom.methods import load_method_recipe
    from stillroom.report import build_report

    method, resolved = load_method_recipe(
        recipe, with_threads(overrides, threads), trust_remote_code=trust_remote_code
    )
    run_dir = out or Path("runs") / resolved.name
    if rank() > 0:  # launched as several processes: only rank 0 writes run_dir and prints
        method.run(resolved, process_run_dir(run_dir, resume), resume=resume, progress=False)
        return
    try:
        # a method replaces an earlier run only after every check passed: a typo loses nothing
        method.run(resolved, run_dir, resume=resume, progress=progress, force=force)
        # the report first: its latency (measured once more, carefully) is the one the table shows
        page = build_report(run_dir) if report else None
        console.print(terminal_table(read_summary(run_dir)))
        console.print(f"run folder: {run_dir}\n  {run_dir / 'results.md'}", soft_wrap=True)
        if page is not None:
            console.print(f"report: {page}", soft_wrap=True)
    finally:
        release(run_dir)


def check(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe to validate")],
    overrides: OverridesArg = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Validate a recipe and print it resolved, defaults included."""
    from stillroom.methods import load_method_recipe

    _, resolved = load_method_recipe(recipe, overrides or [], trust_remote_code=trust_remote_code)
    console.print(dump_recipe(resolved), end="", markup=False, highlight=False)


def methods() -> None:
    """List the distillation methods a recipe's `method:` key can name."""
    from stillroom.methods import METHODS

    for name, method in METHODS.items():
        console.print(f"[bold]{name}[/bold]: {method.summary}", soft_wrap=True)
