"""The `stillroom` command: a thin layer over the Python API (stillroom.demo, stillroom.pipeline).

User mistakes print one line and exit with code 2; an interrupted run says how to resume it.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from stillroom.config import dump_recipe, load_recipe
from stillroom.errors import StillroomError
from stillroom.measure import format_bytes
from stillroom.pipeline import RunResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="stillroom: distil a large teacher into a small, fast student, and report what it keeps.",
)
console = Console()
err_console = Console(stderr=True)

OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="run folder to create")]
ForceOption = Annotated[bool, typer.Option("--force", help="replace an existing run folder")]
ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="show progress bars")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="recipe overrides as dotted key=value, e.g. distill.alpha=0.5"),
]


def _fresh_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to reuse a folder unless --force, and then only one that holds a stillroom run."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not force:
        raise StillroomError(
            f"run folder {run_dir} already exists; pass --resume to continue it, --force to replace it, "
            "or choose another --out"
        )
    if not ((run_dir / "config.yaml").is_file() or (run_dir / "demo.json").is_file()):
        raise StillroomError(
            f"--force only replaces a stillroom run folder, and {run_dir} holds no config.yaml; "
            "choose another --out"
        )
    shutil.rmtree(run_dir)


def _table(title: str, result: RunResult) -> Table:
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


@app.command()
def demo(
    overrides: OverridesArg = None,
    out: OutOption = None,
    seed: Annotated[int, typer.Option(help="seed for data splits, initialisation and order")] = 0,
    force: ForceOption = False,
    progress: ProgressOption = True,
) -> None:
    """Distil a CNN into a 31x smaller MLP on built-in digits, with all labels and with 5% of them."""
    from stillroom.demo import FEW_LABEL_FRACTION, run_demo

    run_dir = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    _fresh_run_dir(run_dir, force)
    started = time.perf_counter()
    result = run_demo(run_dir, seed=seed, progress=progress, overrides=overrides or [])
    titles = {
        "all_labels": "(a) all labels: the student sees every training label",
        "few_labels": f"(b) few labels: the student sees {FEW_LABEL_FRACTION:.0%} of the labels, "
        "the teacher soft-labels every training input",
    }
    for name, setting in result.settings.items():
        console.print(_table(titles[name], setting))
        console.print()
    console.print(f"finished in {time.perf_counter() - started:.0f} s; run folder: {run_dir}")
    for name in result.settings:
        console.print(f"  {run_dir / name / 'results.md'}  (plots: curves.png, size_vs_metric.png)")


@app.command("distill")
def distill_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/digits.yaml")],
    overrides: OverridesArg = None,
    out: OutOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out")] = False,
    force: ForceOption = False,
    progress: ProgressOption = True,
) -> None:
    """Run a recipe: teacher, soft targets, scratch and distilled students, comparison table."""
    from stillroom.pipeline import run_recipe

    resolved = load_recipe(recipe, overrides or [])
    run_dir = out or Path("runs") / resolved.name
    if resume and force:
        raise StillroomError("--resume and --force contradict each other; pass one")
    if not resume:
        _fresh_run_dir(run_dir, force)
    result = run_recipe(resolved, run_dir, resume=resume, progress=progress)
    console.print(_table(f"{resolved.name}: test set", result))
    console.print(f"run folder: {run_dir}\n  {run_dir / 'results.md'}")


@app.command()
def check(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe to validate")],
    overrides: OverridesArg = None,
) -> None:
    """Validate a recipe and print it resolved, defaults included."""
    console.print(
        dump_recipe(load_recipe(recipe, overrides or [])), end="", markup=False, highlight=False
    )


def main() -> None:
    try:
        app()
    except StillroomError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; checkpoints are intact: rerun with --resume to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
