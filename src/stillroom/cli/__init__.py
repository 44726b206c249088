"""The `stillroom` command: a thin layer over the Python API.

COMMANDS is the one table of subcommands. User mistakes print one line and exit with code 2; an
interrupted run says how to resume it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from stillroom.cli import cache, export_cmd, report_cmd, run
from stillroom.cli.common import err_console
from stillroom.errors import StillroomError

COMMANDS: dict[str, Callable[..., None]] = {
    "demo": run.demo,
    "distill": run.distill_command,
    "check": run.check,
    "methods": run.methods,
    "export": export_cmd.export_command,
    "report": report_cmd.report_command,
    "cache": cache.cache_command,
}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="stillroom: distil a large teacher into a small, fast student, and report what it keeps.",
)
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"stillroom {version('stillroom')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        metavar="",
        help="print the version and exit",
    ),
) -> None:
    """stillroom: distil a large teacher into a small, fast student, and report what it keeps."""


def main() -> None:
    try:
        app()
    except StillroomError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; checkpoints are intact: rerun with --resume to continue")
        sys.exit(130)
