"""What every method shares about its run folder: the marker that proves stillroom wrote it, the
lock that lets one process at a time hold it, --resume / --force, and gap closed.

    <run>/.stillroom-run.json   {"kind": "run" | "demo" | "store" | "report", "created", ...}
    <run>/.stillroom.lock       {"pid", "host", "since"} while a process holds the folder

`--force` replaces a folder only when its marker says stillroom wrote it, as the same kind of
folder; a folder that merely holds a `config.yaml` is the user's, and stays. A lock whose process
is gone (killed, crashed) is stale and taken over; temporary files such a process left are removed
when the run resumes.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json, atomic_write_text

MARKER = ".stillroom-run.json"
LOCK = ".stillroom.lock"
KINDS = ("run", "demo", "store", "report")
"""Folders stillroom writes and may later replace: a method's run, the demo's pair of runs, a
soft-target store, a report."""

_held: set[Path] = set()  # run folders this process holds the lock of


# --- the marker ----------------------------------------------------------------------------------


def write_marker(folder: Path, kind: str, **info: Any) -> None:
    """Mark `folder` as written by stillroom (kind: one of KINDS); kept when it exists already."""
    assert kind in KINDS, kind
    path = Path(folder) / MARKER
    if not path.is_file():
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(path, {"kind": kind, "created": created, **info})


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of `folder`, or None when stillroom's marker is absent or unreadable."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") in KINDS else None


def replaceable(folder: Path, kind: str, what: str = "--force") -> None:
    """Refuse, in one line, unless `folder` carries stillroom's marker of `kind` (so it may be
    removed) and no live process holds it."""
    marker = read_marker(folder)
    if marker is None:
        raise StillroomError(
            f"{what} only replaces a folder stillroom wrote, and {folder} holds no {MARKER}, so "
            "it is left untouched; choose another --out (or empty the folder yourself)"
        )
    if marker["kind"] != kind:
        raise StillroomError(
            f"{folder} is a stillroom {marker['kind']} folder, not a {kind} folder; {what} "
            f"does not replace it: choose another --out"
        )
    holder = _live_holder(Path(folder))
    if holder is not None:
        raise StillroomError(f"{what}: {folder} is in use by {holder}; wait for it to finish")


def remove_folder(folder: Path, kind: str) -> None:
    """Remove a folder `replaceable` allowed, saying what goes."""
    files = sum(1 for p in Path(folder).rglob("*") if p.is_file())
    created = (read_marker(folder) or {}).get("created", "?")
    Console(stderr=True).print(
        f"replacing the stillroom {kind} folder {folder} (written {created}, {files} files)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    shutil.rmtree(folder)


# --- the lock ------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _live_holder(folder: Path) -> str | None:
    """'process PID on HOST (since ...)' when another live process holds `folder`, else None."""
    try:
        lock = json.loads((folder / LOCK).read_text())
        pid, host = int(lock["pid"]), str(lock["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no lock, or a damaged one: nobody can be shown to hold the folder
    if pid == os.getpid() and host == socket.gethostname():
        return None
    if host == socket.gethostname() and not _pid_alive(pid):
        return None  # stale: its process is gone
    return f"process {pid} on {host} (since {lock.get('since', '?')})"


def hold(folder: Path) -> None:
    """Take the lock of `folder` for this process (released when the process exits, or by
    `release`); one line when another live process holds it."""
    folder = Path(folder)
    holder = _live_holder(folder)
    if holder is not None:
        raise StillroomError(
            f"run folder {folder} is in use by {holder}; wait for it to finish, or choose "
            "another --out"
        )
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%H:%M:%S")}
    atomic_write_json(folder / LOCK, lock)
    _held.add(folder.resolve())


def release(folder: Path) -> None:
    """Give up the lock of `folder` if this process holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held.discard(folder)
        if _live_holder(folder) is None:  # still ours (or stale): never remove another's lock
            (folder / LOCK).unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for folder in list(_held):
        release(folder)


def clean_temporary(folder: Path) -> int:
    """Remove the `.NAME.tmp-PID` files an interrupted process left under `folder` (the caller
    holds its lock, so no live writer owns them); returns how many."""
    stale = [p for p in Path(folder).rglob(".*.tmp-*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# --- claiming a run folder -----------------------------------------------------------------------


def check_run_dir_free(run_dir: Path, resume: bool, force: bool) -> None:
    """Fail fast, before data is read and models built, on a run folder that is taken (the full
    check, and --force's removal, come after every other check has passed)."""
    if resume and force:
        raise StillroomError("--resume and --force contradict each other; pass one")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (resume or force):
        claim_run_dir(run_dir, force=False)


def claim_run_dir(
    run_dir: Path, force: bool, protected: tuple[Path | None, ...] = (), kind: str = "run"
) -> None:
    """Make sure `run_dir` can be written: absent or empty, or (with force) an earlier stillroom
    folder of `kind`, which is then removed. Never removes a folder that holds inputs of the new
    run (`protected`)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise StillroomError(f"run folder {run_dir} is a file; choose another --out")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not force:
        raise StillroomError(
            f"run folder {run_dir} already exists; pass --resume to continue it, --force to replace it, "
            "or choose another --out"
        )
    replaceable(run_dir, kind)
    for path in protected:
        if path is not None and Path(path).resolve().is_relative_to(run_dir.resolve()):
            raise StillroomError(
                f"--force would delete {path}, which this run reads; copy it out of {run_dir} "
                "or choose another --out"
            )
    remove_folder(run_dir, kind)


SAFE_ON_RESUME = ("threads",)
"""Top-level recipe fields a --resume may change: they change how fast a run goes, not what it
computes (beyond the last bits of float sums)."""


def _without_safe(config: str) -> str:
    """A dumped recipe without its SAFE_ON_RESUME lines (each is one `key: value` line)."""
    keys = "|".join(SAFE_ON_RESUME)
    return re.sub(rf"^(?:{keys}): [^\n]*\n", "", config, flags=re.MULTILINE)


def prepare_run_dir(
    run_dir: Path,
    recipe: BaseModel,
    resume: bool,
    force: bool,
    protected: tuple[Path | None, ...] = (),
) -> None:
    """A fresh run folder holding the marker, the lock and the resolved recipe as config.yaml, or
    (resume) one started with the same recipe, cleaned of an interrupted process's temporary
    files. `force` replaces an earlier run, never deleting the `protected` inputs."""
    from stillroom.config import dump_recipe
    from stillroom.threads import use_threads

    use_threads(getattr(recipe, "threads", "auto"))  # every method starts here
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if resume and force:
        raise StillroomError("--resume and --force contradict each other; pass one")
    if resume:
        if not config_path.is_file():
            raise StillroomError(
                f"nothing to resume in {run_dir}: it holds no config.yaml from an earlier run"
            )
        hold(run_dir)
        try:
            started_with = config_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            started_with = None
        if started_with is not None:
            check_finished_phases(run_dir)
        if started_with is None or _without_safe(started_with) != _without_safe(
            dump_recipe(recipe)
        ):
            release(run_dir)
            raise StillroomError(
                f"the recipe differs from the one {run_dir} was started with (see its config.yaml); "
                "resume with the same recipe and overrides, or start a new run folder"
            )
        write_marker(run_dir, "run", method=getattr(recipe, "method", None))
        clean_temporary(run_dir)
        atomic_write_text(config_path, dump_recipe(recipe))  # a safe change is recorded
        return
    claim_run_dir(run_dir, force, protected)
    run_dir.mkdir(parents=True, exist_ok=True)
    hold(run_dir)
    write_marker(run_dir, "run", method=getattr(recipe, "method", None))
    atomic_write_text(config_path, dump_recipe(recipe))


# --- phases: one completion marker for every method ---------------------------------------------

DONE = "done.json"
"""Written last, atomically, into a phase's folder once its model is saved: `--resume` loads a
folder holding it instead of training again, and continues any other from its checkpoints."""


def check_finished_phases(run_dir: Path) -> None:
    """Before a resume trusts them: every phase folder marked finished holds a readable done.json
    and, where it saved a stillroom model, a model.json that rebuilds and its weights file. One
    line naming the folder, with what to do, instead of a failure after hours of the next phase."""
    from stillroom.models import read_model_json

    for done in sorted(Path(run_dir).glob(f"*/{DONE}")) + sorted(Path(run_dir).glob(f"*/*/{DONE}")):
        phase = done.parent
        try:
            json.loads(done.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise StillroomError(
                f"{done} is damaged; delete {phase} and rerun with --resume to redo that phase"
            ) from None
        if (phase / "model.json").is_file():
            try:
                read_model_json(phase)
            except StillroomError as err:
                raise StillroomError(
                    f"{err}; delete {phase} and rerun with --resume to redo that phase"
                ) from None
            weights = phase / "model.safetensors"
            if weights.is_symlink() or not weights.is_file():
                raise StillroomError(
                    f"{phase} is marked finished but holds no model.safetensors; delete {phase} "
                    "and rerun with --resume to redo that phase"
                )


def is_complete(folder: Path) -> bool:
    return (Path(folder) / DONE).is_file()


def mark_complete(folder: Path, record: dict[str, Any] | None = None) -> None:
    atomic_write_json(Path(folder) / DONE, record or {})


# --- the figure of merit every method reports ----------------------------------------------------


def gap_closed(rows: dict[str, dict[str, Any]], metric: str) -> float | None:
    """(kd - scratch) / (teacher - scratch): the share of the teacher's lead the distillation
    recovers. None without a scratch student, or when the teacher does not lead (the ratio would
    be meaningless). `metric` may be "<output>/<metric>" (multi-task)."""
    from stillroom.results import gap_note  # the one formula, with the line that explains it
    from stillroom.train.evaluate import METRICS  # the loop's table; runs.py stays import-light

    if "student_scratch" not in rows:
        return None
    lower_is_better = {name: way for name, way in METRICS.values()}.get(
        metric.rsplit("/", 1)[-1]
    ) == "min"
    value = {role: rows[role][metric] for role in ("teacher", "student_scratch", "student_kd")}
    return gap_note(*value.values(), metric, not lower_is_better)[0]
