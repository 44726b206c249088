"""Error types for mistakes a user can fix.

The CLI prints a `StillroomError` as one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class StillroomError(Exception):
    """A user mistake (bad recipe, missing file, mismatched models); the message says how to fix it."""


class NonFiniteLossError(StillroomError):
    """A loss term became NaN or inf; training stopped before the bad step touched the weights."""
