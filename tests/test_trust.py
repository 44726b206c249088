"""The trust boundary (issue 12, item 2): nothing in a recipe, run folder, store or model folder
imports or runs code the user did not ask for on the command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, stillroom_in_process
from stillroom.errors import StillroomError

TINY_CAUSAL = "recipes/tiny_causal.yaml"


def _error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_recipe_cannot_grant_remote_code(tmp_path: Path, where: str) -> None:
    recipe = tmp_path / "causal.yaml"
    text = (ROOT / TINY_CAUSAL).read_text()
    if where == "file":
        text = text.replace("teacher:\n", "teacher:\n  trust_remote_code: true\n", 1)
        result = stillroom_in_process("check", _write(recipe, text))
    else:
        result = stillroom_in_process("check", TINY_CAUSAL, "teacher.trust_remote_code=true")
    line = _error_line(result)
    assert "teacher.trust_remote_code" in line and "pass --trust-remote-code" in line


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_flag_grants_it_and_only_where_a_folder_can_run_code() -> None:
    granted = stillroom_in_process("check", TINY_CAUSAL, "--trust-remote-code")
    assert granted.returncode == 0, granted.stderr
    assert "trust_remote_code: true" in granted.stdout
    plain = stillroom_in_process("check", TINY_CAUSAL)
    assert "trust_remote_code: false" in plain.stdout
    line = _error_line(stillroom_in_process("check", "recipes/digits.yaml", "--trust-remote-code"))
    assert "never runs a model folder's code" in line


def test_the_python_argument_grants_it() -> None:
    from stillroom.methods import load_method_recipe

    with pytest.raises(StillroomError, match="--trust-remote-code"):
        load_method_recipe(TINY_CAUSAL, ["teacher.trust_remote_code=true"])
    _, recipe = load_method_recipe(TINY_CAUSAL, trust_remote_code=True)
    assert recipe.teacher.trust_remote_code is True


def test_the_warning_names_the_files_that_will_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stillroom.llm.hub import warn_remote_code

    (tmp_path / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    (tmp_path / "configuration_evil.py").write_text("")
    warn_remote_code(tmp_path)
    err = capsys.readouterr().err
    assert "warning: --trust-remote-code" in err
    assert "configuration_evil.py, modeling_evil.py" in err


def _tripwire_package(root: Path, name: str) -> Path:
    """A package whose import leaves a file behind: proof that something imported it."""
    package = root / name
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(root / 'IMPORTED')!r}, 'w').write('{name}')\n")
    return package


def test_teacher_package_is_read_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stillroom.llm.hub import package_folder

    package = _tripwire_package(tmp_path, "tripwire_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_folder("tripwire_pkg") == package
    assert package_folder("tripwire_pkg.model") == package / "model"  # a parent, not imported
    assert not (tmp_path / "IMPORTED").exists()
    assert "tripwire_pkg" not in sys.modules
    with pytest.raises(StillroomError, match="no folder"):
        package_folder("tripwire_pkg.nothing")
    with pytest.raises(StillroomError, match="not a package name"):
        package_folder("../tripwire_pkg")


def test_a_received_model_folder_never_imports_its_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tripwire_package(tmp_path, "received_models")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "student"
    folder.mkdir()
    spec = {"kind": "factory", "factory": "received_models:build", "search_paths": [str(tmp_path)]}
    (folder / "model.json").write_text(
        json.dumps({"spec": spec, "input_shape": [4], "num_outputs": 3})
    )
    for command in ("export", "report"):
        result = stillroom_in_process(command, folder, "--out", tmp_path / "out")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "IMPORTED").exists()
    from stillroom.models import load_model

    with pytest.raises(StillroomError, match="--trust-factory"):
        load_model(folder)
    assert not (tmp_path / "IMPORTED").exists()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    from stillroom.store import cache_teacher

    torch.manual_seed(0)
    out = tmp_path / "store"
    cache_teacher(torch.nn.Linear(4, 3), torch.randn(20, 4), out, shard_size=8, progress=False)
    return out


@pytest.mark.parametrize(
    "name", ["../../secret.npy", "/etc/passwd", "00001.logits.npy", "sub/00000.logits.npy"]
)
def test_store_shard_names_stay_in_the_store(store: Path, name: str) -> None:
    from stillroom.store import SoftTargetStore

    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["files"]["logits"]["file"] = name
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StillroomError, match=r"shard 0's logits file must be named 00000"):
        SoftTargetStore.open(store)


def test_a_symlinked_shard_is_refused(store: Path, tmp_path: Path) -> None:
    from stillroom.store import SoftTargetStore

    shard = store / "shards" / "00000.logits.npy"
    outside = tmp_path / "outside.npy"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(outside, shard)
    with pytest.raises(StillroomError, match="symbolic link"):
        SoftTargetStore.open(store)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "..", "a/b", "x" * 101])
def test_a_run_name_stays_in_runs(name: str) -> None:
    line = _error_line(stillroom_in_process("check", "recipes/digits.yaml", f"name={name}"))
    assert "plain folder name" in line
