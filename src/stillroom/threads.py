"""How many CPU threads torch uses: the `threads` recipe field and the `--threads` flag.

Small students gain little from more threads, and on a shared machine OpenMP threads that wait
for a busy core cost far more than they give (the demo on a loaded 2-core machine: 211 s with
torch's default of one thread per core, 45 s with one thread). So `auto`, the default, uses the
cores that are idle now: the machine's cores (those this process may run on) minus the 1-minute
load average, rounded, at least 1 and at most AUTO_MAX; an OMP_NUM_THREADS the user exported
wins over `auto`. A number is used as given, clamped (with a warning) to 1..cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch

Threads = int | Literal["auto"]

AUTO_MAX = 8
"""`auto` never picks more: the small models stillroom trains on CPUs stop scaling before."""


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def idle_cores() -> int:
    """Cores minus the 1-minute load average, rounded; at least 1."""
    total = cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return total
    return max(1, min(total, round(total - load)))


def choose_threads(requested: Threads) -> tuple[int | None, str | None]:
    """(threads to set, or None to leave torch as it is; a warning line, or None)."""
    total = cores()
    if requested == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return None, None
        return min(AUTO_MAX, idle_cores()), None
    if requested < 1:
        return 1, f"threads: {requested} is below 1; using 1 thread"
    if requested > total:
        return (
            total,
            f"threads: {requested} is more than this machine's {total} cores; using {total}",
        )
    return requested, None


def use_threads(requested: Threads = "auto", warn: Callable[[str], None] | None = None) -> int:
    """Set torch's intra-op threads from a `threads` setting; returns the count in use.
    warn: where a clamping warning goes (default: stderr)."""
    count, warning = choose_threads(requested)
    if warning is not None:
        if warn is None:
            import sys

            print(f"warning: {warning}", file=sys.stderr)
        else:
            warn(warning)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    return torch.get_num_threads()
