"""What the CLI commands share: consoles, options, the run-folder guard."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stillroom.runs import claim_run_dir

# off a terminal (a pipe, a CI log) rich assumes 80 columns and would fold every wide table;
# a log has room, so only a real terminal's width applies
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True)

OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="run folder to create")]
ForceOption = Annotated[
    bool, typer.Option("--force", help="replace an existing run folder", metavar="")
]
TrustFactoryOption = Annotated[
    bool,
    typer.Option(
        "--trust-factory",
        metavar="",
        help="rebuild models made by a user factory (module:function) named in the folder: this "
        "imports and runs that module's code, so only for folders you trust",
    ),
]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        metavar="",
        help="let transformers run the Python files shipped in the recipe's model folder "
        "(modeling_*.py): arbitrary code, only for folders you trust; a recipe cannot ask for it",
    ),
]
ReportOption = Annotated[
    bool,
    typer.Option(
        "--report/--no-report", help="write the HTML compression report at the end", metavar=""
    ),
]
ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="show progress bars", metavar="")
]
ThreadsOption = Annotated[
    str | None,
    typer.Option(
        "--threads",
        metavar="N|auto",
        help="CPU threads for torch (default: the recipe's `threads`, auto = the idle cores)",
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="recipe overrides as dotted key=value, e.g. distill.alpha=0.5"),
]


def fresh_run_dir(run_dir: Path, force: bool, kind: str = "run") -> None:
    """Refuse to reuse a folder unless --force, and then only a stillroom folder of `kind`."""
    claim_run_dir(run_dir, force, kind=kind)


def with_threads(overrides: list[str] | None, flag: str | None) -> list[str]:
    """The recipe overrides with --threads as one more (`threads=N`): the recipe's field is the
    one setting, validated and recorded in config.yaml like any other."""
    return [*(overrides or []), *([] if flag is None else [f"threads={flag.strip()}"])]
