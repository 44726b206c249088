"""The run folder: stillroom's marker, --force that never removes a user's folder, the lock that
lets one process hold a run, stale temporary files, an interrupted report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, assert_user_error, stillroom_in_process, tree_digest
from stillroom.errors import StillroomError
from stillroom.runs import LOCK, MARKER, clean_temporary, hold, read_marker, release, write_marker

RECIPE = ROOT / "recipes" / "digits.yaml"
TINY = [
    "teacher.kind=mlp",
    "teacher.hidden=[16]",
    "teacher.train.epochs=1",
    "student.hidden=[8]",
    "distill.epochs=1",
    "baseline=false",
]


def test_force_leaves_a_user_folder_holding_config_yaml_untouched(tmp_path: Path) -> None:
    # the repro of the data loss: a project folder that happens to hold a config.yaml
    project = tmp_path / "p"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("db: x\n")
    (project / "src" / "t.tex").write_text("keep\n")
    before = tree_digest(project)
    result = stillroom_in_process("distill", RECIPE, *TINY, "--out", project, "--force")
    assert_user_error(result, f"holds no {MARKER}, so it is left untouched")
    assert tree_digest(project) == before


def test_force_replaces_a_run_it_wrote_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = stillroom_in_process(
        "distill", RECIPE, *TINY, "--out", out, "--no-progress", "--no-report"
    )
    assert first.returncode == 0, first.stderr
    assert read_marker(out)["kind"] == "run"
    assert not (out / LOCK).exists()  # released when the command ended
    (out / "stray.txt").write_text("from the earlier run")
    again = stillroom_in_process(
        "distill", RECIPE, *TINY, "--out", out, "--force", "--no-progress", "--no-report"
    )
    assert again.returncode == 0, again.stderr
    assert f"replacing the stillroom run folder {out}" in " ".join(again.stderr.split())
    assert not (out / "stray.txt").exists() and (out / "results.json").is_file()


def test_force_refuses_a_stillroom_folder_of_another_kind(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    write_marker(store, "store")
    (store / "manifest.json").write_text("{}")
    before = tree_digest(store)
    result = stillroom_in_process("distill", RECIPE, *TINY, "--out", store, "--force")
    assert_user_error(result, "is a stillroom store folder, not a run folder")
    assert tree_digest(store) == before


def test_cache_force_needs_the_store_marker_not_just_a_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"my": "web app"}')
    before = tree_digest(folder)
    teacher = tmp_path / "teacher"
    from stillroom.models import build_model, save_model

    save_model(
        build_model({"kind": "mlp", "hidden": [4]}, (1, 8, 8), 10),
        {"kind": "mlp", "hidden": [4]},
        teacher,
        input_shape=[1, 8, 8],
        num_outputs=10,
    )
    result = stillroom_in_process(
        "cache", RECIPE, f"teacher.checkpoint={teacher}", "--out", folder, "--force"
    )
    assert_user_error(result, f"holds no {MARKER}")
    assert tree_digest(folder) == before


@pytest.fixture
def live_pid():
    """The pid of another live process (a sleeping child), stopped at the end."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def _lock_by(folder: Path, pid: int) -> None:
    lock = {"pid": pid, "host": socket.gethostname(), "since": "10:00:00"}
    (folder / LOCK).write_text(json.dumps(lock))


def test_a_second_process_on_one_run_folder_is_refused(tmp_path: Path, live_pid: int) -> None:
    out = tmp_path / "run"
    out.mkdir()
    write_marker(out, "run")
    (out / "config.yaml").write_text("name: x\n")
    _lock_by(out, live_pid)
    resumed = stillroom_in_process("distill", RECIPE, *TINY, "--out", out, "--resume")
    assert_user_error(resumed, f"is in use by process {live_pid}")
    forced = stillroom_in_process("distill", RECIPE, *TINY, "--out", out, "--force")
    assert_user_error(forced, f"is in use by process {live_pid}")
    assert (out / "config.yaml").read_text() == "name: x\n"


def test_a_stale_lock_is_taken_over_and_temporary_files_cleaned(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(child.stdout)  # that process has exited
    folder = tmp_path / "run"
    (folder / "teacher").mkdir(parents=True)
    _lock_by(folder, dead)
    (folder / "teacher" / f".model.safetensors.tmp-{dead}").write_bytes(b"half a file")
    hold(folder)
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert clean_temporary(folder) == 1
    assert not list(folder.rglob(".*.tmp-*"))
    release(folder)
    assert not (folder / LOCK).exists()


def test_resume_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = stillroom_in_process(
        "distill", RECIPE, *TINY, "--out", out, "--no-progress", "--no-report"
    )
    assert first.returncode == 0, first.stderr
    (out / "teacher" / ".metrics.jsonl.tmp-999999").write_text("partial")
    resumed = stillroom_in_process(
        "distill", RECIPE, *TINY, "--out", out, "--resume", "--no-progress", "--no-report"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob(".*.tmp-*"))


def test_an_interrupted_report_is_written_again(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = stillroom_in_process("distill", RECIPE, *TINY, "--out", out, "--no-progress")
    assert first.returncode == 0, first.stderr
    report = out / "report"
    # what a report killed after its first figure leaves: the marker and one PNG
    for path in report.iterdir():
        if path.name not in (MARKER, "tradeoff.png"):
            path.unlink()
    again = stillroom_in_process("report", out)
    assert again.returncode == 0, again.stderr
    assert (report / "report.html").is_file() and (report / "report.json").is_file()


def test_hold_refuses_only_other_live_processes(tmp_path: Path, live_pid: int) -> None:
    _lock_by(tmp_path, live_pid)
    with pytest.raises(StillroomError, match="in use by process"):
        hold(tmp_path)
    _lock_by(tmp_path, os.getpid())
    hold(tmp_path)  # this process already holds it: resuming in-process is allowed
    release(tmp_path)


def test_every_methods_resume_takes_the_lock(tmp_path: Path, live_pid: int) -> None:
    """The chain's resume has its own recipe comparison; it holds the folder all the same."""
    chain = ROOT / "recipes" / "digits_born_again.yaml"
    out = tmp_path / "chain"
    out.mkdir()
    write_marker(out, "run", method="born_again")
    (out / "config.yaml").write_text("method: born_again\nname: x\n")
    _lock_by(out, live_pid)
    resumed = stillroom_in_process("distill", chain, "--out", out, "--resume")
    assert_user_error(resumed, f"is in use by process {live_pid}")
    assert (out / "config.yaml").read_text() == "method: born_again\nname: x\n"
