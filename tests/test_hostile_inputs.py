"""Hostile input outside the data layer (issue 12, items 1, 3, 4): every case one line, exit 2
(130 for Ctrl-C), no traceback, nothing allocated or trained first."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import stillroom_in_process
from stillroom.errors import StillroomError

DIGITS = "recipes/digits.yaml"


def _error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:3]
    return lines[0]


# --- recipes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("student.hidden=[-1]", "student.hidden.0: Input should be greater than or equal to 1"),
        ("student.hidden=[100000000000]", "student.hidden.0: Input should be less than or equal"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=18446744073709551617", "seed: Input should be less than or equal to 4294967295"),
        ("distill.lr=.nan", "distill.lr"),
        ("teacher.epochs=3", "did you mean 'teacher.train.epochs'?"),
        ("distill.aplha=0.5", "did you mean 'alpha'?"),
        ("=3", "must look like key=value"),
        ("a..b=3", "empty part"),
    ],
)
def test_values_that_would_crash_later_are_refused_at_load(override: str, fragment: str) -> None:
    assert fragment in _error_line(stillroom_in_process("check", DIGITS, override))


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    levels = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + levels)
    assert recipe.stat().st_size < 1024
    started = time.perf_counter()
    line = _error_line(stillroom_in_process("check", recipe))
    assert time.perf_counter() - started < 2
    assert "expands to more than" in line and len(line) < 300


def test_deep_nesting_and_binary_recipes_are_refused(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    assert "nested deeper than" in _error_line(stillroom_in_process("check", deep))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    assert "is not UTF-8 text" in _error_line(stillroom_in_process("check", binary))


def test_a_family_that_does_not_fit_the_data_is_refused_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill", "recipes/diabetes_regression.yaml", "teacher.kind=cnn", "--out", out
    )
    assert "cnn needs image inputs" in _error_line(result)
    assert not out.exists()


# --- model folders -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must be a mapping with a 'spec'"),
        ('{"input_shape": [4], "num_outputs": 3}', "must be a mapping with a 'spec'"),
        ('{"spec": {"kind": "mlp"}, "input_shape": [4], "num_outputs": "ten"}', "num_outputs"),
        ('{"spec": {"kind": "mlp", "hidden": [-3]}, "input_shape": [4], "num_outputs": 3}', "-3"),
        (
            '{"spec": {"kind": "mlp", "hidden": [1000000, 1000000]}, "input_shape": [4], '
            '"num_outputs": 3}',
            "parameters (more than",
        ),
        ('{"spec": {"kind": "mlp"}, "input_shape": [1000000000000], "num_outputs": 3}', "values"),
        ('{"spec": {"kind": "nope"}, "input_shape": [4], "num_outputs": 3}', "not a model kind"),
    ],
)
def test_model_json_is_checked_before_anything_is_built(
    tmp_path: Path, text: str, fragment: str
) -> None:
    from stillroom.models import load_model

    (tmp_path / "model.json").write_text(text)
    with pytest.raises(StillroomError, match=None) as err:
        load_model(tmp_path)
    assert fragment in str(err.value)


def test_a_missing_checkpoint_does_not_exist(tmp_path: Path) -> None:
    result = stillroom_in_process(
        "distill", DIGITS, "teacher.checkpoint=nope", "--out", tmp_path / "run"
    )
    assert "model folder nope does not exist" in _error_line(result)


# --- run folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "fragment"),
    [("- a\n- list\n", "must be a mapping"), ("a: [unclosed\n", "invalid YAML")],
)
def test_a_damaged_run_folder_is_one_line(tmp_path: Path, config: str, fragment: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config)
    for command in ("export", "report"):
        line = _error_line(stillroom_in_process(command, run, "--out", tmp_path / "out"))
        assert fragment in line and "config.yaml" in line


def test_a_damaged_summary_is_one_line(tmp_path: Path) -> None:
    from stillroom.results import read_summary

    (tmp_path / "summary.json").write_text('{"models": [{"bogus": 1}]}')
    with pytest.raises(StillroomError, match=r"summary\.json is damaged"):
        read_summary(tmp_path)


def test_a_damaged_export_manifest_is_reported_not_raised(tmp_path: Path) -> None:
    from stillroom.report.build import _export_manifest_fits

    assert not _export_manifest_fits([1])
    assert not _export_manifest_fits({"files": {}, "inputs": [{}], "model": {}})
    assert not _export_manifest_fits(
        {"source": {"role": "../../etc"}, "files": {}, "inputs": [], "model": {"parameters": 1}}
    )


# --- stores: edited manifests, damage found before the first phase -------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    from stillroom.store import cache_teacher

    torch.manual_seed(0)
    out = tmp_path / "store"
    cache_teacher(torch.nn.Linear(4, 3), torch.randn(20, 4), out, shard_size=8, progress=False)
    return out


def _edited(store: Path, edit) -> Path:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.pop("shards"), "lists 3 shards, this one 0"),
        (lambda m: m.update(shards=[]), "lists 3 shards, this one 0"),
        (lambda m: m["shards"][0].pop("files"), "must list a file for each field"),
        (lambda m: m["fields"]["logits"].update(dtype="nonsense"), "not a dtype"),
        (lambda m: m.update(shard_size="abc"), "shard_size must be a whole number"),
        (lambda m: m.update(shard_size=0), "shard_size must be a whole number >= 1"),
        (lambda m: m.update(kind="topk"), "top_k"),
        (lambda m: m.update(teacher=None), "teacher must record"),
    ],
)
def test_edited_store_manifests_are_refused_on_open(store: Path, edit, fragment: str) -> None:
    from stillroom.store import SoftTargetStore

    with pytest.raises(StillroomError) as err:
        SoftTargetStore.open(_edited(store, edit))
    assert fragment in str(err.value) and "recreate it" in str(err.value)


def test_a_flipped_byte_is_found_before_any_student_trains(store: Path) -> None:
    from stillroom.store import StoreTeacher

    shard = store / "shards" / "00002.logits.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StillroomError, match=r"00002\.logits\.npy \(shard 2\) is corrupted") as err:
        StoreTeacher(store)  # what the classic workflow builds right after the teacher phase
    assert "stillroom cache ... --resume" in str(err.value)


# --- the CLI's own guard -------------------------------------------------------------------------


def test_os_errors_are_one_line_with_the_path_and_the_reason(tmp_path: Path) -> None:
    from stillroom.cli import _os_error_line

    denied = _os_error_line(PermissionError(13, "Permission denied", "/srv/runs/x"))
    assert denied.startswith("/srv/runs/x: Permission denied") and "No such file" not in denied
    (tmp_path / "file").write_text("")
    result = stillroom_in_process("distill", DIGITS, "--out", tmp_path / "file" / "run")
    assert "Not a directory" in _error_line(result)
    result = stillroom_in_process("distill", DIGITS, "--out", tmp_path / ("a" * 300))
    assert "File name too long" in _error_line(result)


def test_ctrl_c_prints_how_to_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    import stillroom.methods

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stillroom.methods, "load_method_recipe", interrupted)
    result = stillroom_in_process("check", DIGITS)
    assert result.returncode == 130
    assert "interrupted" in result.stderr and "rerun with --resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_during_training_names_the_phase_and_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stillroom.train.loop as loop

    real_save, calls = loop.save_checkpoint, []

    def save_then_stop(*args, **kwargs):
        calls.append(real_save(*args, **kwargs))
        if len(calls) == 2:  # the teacher's second epoch has been saved
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    tiny = ["teacher.channels=[4]", "teacher.hidden=[8]", "teacher.train.epochs=3"]
    out = tmp_path / "run"
    result = stillroom_in_process("distill", DIGITS, *tiny, "--out", out, "--no-progress")
    assert result.returncode == 130
    assert (
        "interrupted during teacher at epoch 2; checkpoints are intact: rerun with --resume"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert (out / "teacher" / "checkpoints").is_dir()


def test_a_huge_error_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    import stillroom.methods

    def huge(*args, **kwargs):
        raise StillroomError("x" * 10**6)

    monkeypatch.setattr(stillroom.methods, "load_method_recipe", huge)
    line = _error_line(stillroom_in_process("check", DIGITS))
    assert len(line) < 1100 and "1,000,000 characters" in line


def test_weights_are_written_with_the_umask(tmp_path: Path) -> None:
    from stillroom.io import atomic_save_tensors

    old = os.umask(0o022)
    try:
        atomic_save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


# --- data files with nothing to learn, or that are not real numbers -------------------------------
X6 = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)


@pytest.mark.parametrize(
    ("inputs", "targets", "expected"),
    [
        (X6, np.full(40, np.nan, dtype=np.float32), "has no labels (every target is NaN)"),
        (X6, np.full(40, 2.5, dtype=np.float32), "every target is 2.5, so there is nothing"),
        (X6, np.zeros(40, dtype=np.int64), "has one class only (0)"),
        (X6.astype(np.complex64), np.arange(40) % 2, "its inputs are complex64"),
        (np.array(["a"] * 40), np.arange(40) % 2, "its inputs are <U1"),
        (
            np.where(np.arange(240).reshape(40, 6) == 75, np.inf, X6),
            np.arange(40) % 2,
            "inputs hold NaN or inf (first in sample 12)",
        ),
        (X6[:, 0], np.arange(40) % 2, "give inputs (N, features...)"),
    ],
    ids=["all-nan", "constant", "one-class", "complex", "strings", "inf", "1-d-inputs"],
)
def test_an_npz_with_nothing_to_learn_is_refused_before_training(
    tmp_path: Path, inputs, targets, expected
) -> None:
    data = tmp_path / "bad.npz"
    np.savez(data, inputs=inputs, targets=targets)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = stillroom_in_process(
        "distill", DIGITS, "data.source=npz", f"data.path={data}", "--out", tmp_path / "run"
    )
    assert expected in _error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder left behind
