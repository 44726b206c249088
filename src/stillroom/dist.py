"""Several processes (torchrun, accelerate launch): which one writes the run folder.

Every process runs the whole recipe (data, each phase, evaluation), Accelerate keeps their models
in step (DDP: each process takes every world_size-th batch, gradients are averaged), so every
process ends with the same models. Only the main one (rank 0) writes the run folder the user
named; the others run in a private scratch folder of their own, removed when they exit, so no two
processes ever write the same file or contend for the run folder's lock. On --resume a scratch
folder starts as a copy of the run folder, so every process continues from the same phase and
checkpoint.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from stillroom.errors import StillroomError


def rank() -> int:
    """This process's global rank as the launcher set it (0 when launched alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def process_run_dir(run_dir: Path, resume: bool) -> Path:
    """The folder this process writes: `run_dir` itself on rank 0, a scratch copy on the others."""
    if rank() == 0:
        return Path(run_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f"stillroom-rank{rank()}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    folder = scratch / Path(run_dir).name
    if resume:
        if not Path(run_dir).is_dir():
            raise StillroomError(
                f"rank {rank()} cannot see {run_dir} to resume from: every process needs the run "
                "folder on a file system it can read (a shared one across machines)"
            )
        # the lock and temporary files are rank 0's; the rest is what this process resumes from
        shutil.copytree(
            run_dir, folder, ignore=shutil.ignore_patterns(".stillroom.lock", ".*.tmp-*")
        )
    return folder
