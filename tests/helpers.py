"""Shared by the CLI tests: run the real `stillroom` command, check a user error."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def stillroom(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m stillroom.cli ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "stillroom.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit code 2, one `error: ...` line containing `fragment`, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    assert fragment in " ".join(message.split()), message


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path: proves nothing was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stillroom_in_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The same command called in this process (no interpreter start-up, ~3 s saved per call):
    for tests where a subprocess adds nothing. Output and exit code as `stillroom` gives them."""
    import contextlib
    import io

    from stillroom import models
    from stillroom.cli import main

    allowed = set(models._ALLOWED_FACTORIES)  # what a process would forget when it exits
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = ["stillroom", *map(str, args)]
    with (
        contextlib.chdir(ROOT),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        old_argv, sys.argv = sys.argv, argv
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = old_argv
            models._ALLOWED_FACTORIES.clear()
            models._ALLOWED_FACTORIES.update(allowed)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
