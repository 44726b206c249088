"""Error types for mistakes a user can fix.

The CLI prints a `StillroomError` as one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class StillroomError(Exception):
    """A user mistake (bad recipe, missing file, mismatched models); the message says how to fix it."""


class NonFiniteLossError(StillroomError):
    """A loss term became NaN or inf; training stopped before the bad step touched the weights."""


# where the training loop was when Ctrl-C reached it ("student_kd at epoch 3"), for the CLI's
# one line; one slot, overwritten by each interrupt and cleared by the CLI when it starts
INTERRUPTED_AT: list[str] = []


def _one_line_interrupt_at_start_up() -> None:
    """The `stillroom` command interrupted while Python still imports it (torch takes seconds)
    prints one line instead of a 20-line traceback; Python then exits with SIGINT's status (130).
    Installed only for the command (the entry-point script, or `python -m stillroom`, whose
    argv[0] reads "-m" while its package is imported), never for a library user's program."""
    import os
    import sys
    from pathlib import Path

    command = sys.argv[0] if sys.argv else ""
    if command != "-m" and Path(command).name != "stillroom":
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        # an interrupt inside a C extension's import often surfaces as another error (numpy:
        # "cannot load module more than once") with the KeyboardInterrupt in its context
        seen: BaseException | None = value
        for _ in range(32):
            if seen is None:
                break
            if isinstance(seen, KeyboardInterrupt):
                sys.stderr.write("interrupted while starting; nothing was written\n")
                sys.stderr.flush()
                os._exit(130)
            seen = seen.__cause__ or seen.__context__
        previous(kind, value, tb)  # type: ignore[arg-type]

    sys.excepthook = hook


_one_line_interrupt_at_start_up()
