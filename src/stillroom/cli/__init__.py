"""The `stillroom` command: a thin layer over the Python API.

COMMANDS is the one table of subcommands. User mistakes print one line and exit with code 2; an
interrupted run says how to resume it.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import NoReturn

import typer
from typer import rich_utils

from stillroom.cli import cache, export_cmd, report_cmd, run, search_cmd, tune_cmd
from stillroom.cli.common import err_console
from stillroom.errors import INTERRUPTED_AT, StillroomError

try:  # Typer >= 0.22 vendors its own click; earlier ones use click itself
    from typer._click.exceptions import ClickException
except ImportError:
    from click.exceptions import ClickException

COMMANDS: dict[str, Callable[..., None]] = {
    "demo": run.demo,
    "distill": run.distill_command,
    "check": run.check,
    "methods": run.methods,
    "export": export_cmd.export_command,
    "report": report_cmd.report_command,
    "cache": cache.cache_command,
    "tune": tune_cmd.tune_command,
    "search": search_cmd.search_command,
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


MAX_MESSAGE = 1000
"""Characters of an error line the CLI prints: a message quoting a huge input stays one line."""

INTERRUPTED = "interrupted; checkpoints are intact: rerun with --resume to continue"


def _interrupted() -> str:
    """The Ctrl-C line, naming the phase and epoch the training loop was in, if it was in one."""
    if not INTERRUPTED_AT:
        return INTERRUPTED
    return f"interrupted during {INTERRUPTED_AT[0]}; checkpoints are intact: rerun with --resume"


def _one_line(message: str) -> str:
    text = " ".join(str(message).split())
    return (
        text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE]}... ({len(text):,} characters)"
    )


def _os_error_line(err: OSError) -> str:
    """An OSError as the path and the reason, e.g. "cannot write runs/x: Permission denied"."""
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or type(err).__name__
    where = " -> ".join(str(p) for p in paths) or "a file"
    hint = {
        errno.EACCES: "check the folder's permissions, or choose another --out",
        errno.EPERM: "check the folder's permissions, or choose another --out",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENAMETOOLONG: "use a shorter name",
        errno.ENOSPC: "the disk is full: free some space, then rerun with --resume",
    }.get(err.errno or 0, "")
    return f"{where}: {reason}" + (f"; {hint}" if hint else "")


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"error: {_one_line(message)}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """The `stillroom` command. Every user mistake ends here as one `error: ...` line (exit 2),
    an OS refusal as one line with the path and the reason (exit 2), Ctrl-C as one line (exit
    130). Typer runs in non-standalone mode so that none of them is swallowed or reformatted."""
    INTERRUPTED_AT.clear()  # a library caller's earlier interrupt is not this command's
    try:
        code = app(standalone_mode=False)
    except StillroomError as err:
        _fail(str(err))
    except ClickException as err:  # usage errors: Typer's own box, as before
        rich_utils.rich_format_error(err)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print(_interrupted(), markup=False, highlight=False, soft_wrap=True)
        sys.exit(130)
    except OSError as err:
        _fail(_os_error_line(err))
    if code == 130:  # Typer turns a KeyboardInterrupt inside a command into Exit(130)
        err_console.print(_interrupted(), markup=False, highlight=False, soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)
