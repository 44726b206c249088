"""Born-again / teacher-assistant chains: the Python API, a failing generation and its resume,
the CLI end to end, and bad recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from helpers import assert_user_error, stillroom_in_process, tree_digest
from stillroom.data import make_loader
from stillroom.errors import StillroomError
from stillroom.methods import METHODS, load_method_recipe
from stillroom.methods.born_again import ChainRecipe, describe, run_chain
from stillroom.methods.chain import GenerationFailed, agreement, distill_chain, is_complete
from stillroom.results import read_summary, terminal_table
from stillroom.train import loop as loop_module

RECIPES = Path(__file__).parent.parent / "recipes"
TINY = ["teacher.train.epochs=1", "distill.epochs=1", "data.batch_size=256"]
BROKEN = "generations=[{kind: mlp, hidden: [16]}, {kind: mlp, hidden: [8], lr: 1.0e+9}]"
FIXED = "generations=[{kind: mlp, hidden: [16]}, {kind: mlp, hidden: [8]}]"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _one_thread_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CLI subprocesses inherit it: tiny models train faster on one thread of a busy machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def loaders(digits):
    return (
        make_loader(digits.train, 32, shuffle=True),
        make_loader(digits.val, 64, shuffle=False),
        make_loader(digits.test, 64, shuffle=False),
    )


def test_agreement_and_labels() -> None:
    a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    b = torch.tensor([[9.0, 1.0], [4.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert agreement(a, a) == 1.0 and agreement(a, b) == 0.75
    assert describe({"kind": "mlp", "hidden": [128, 64]}) == "mlp 128-64"
    assert describe({"kind": "cnn", "channels": [32, 64], "hidden": [128]}) == "cnn 32-64/128"
    assert "born_again" in METHODS


def test_python_chain_fails_in_generation_2_and_resumes(
    loaders, make_mlp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation 2 dies after its first epoch's checkpoint; the resumed chain skips generation 1,
    continues generation 2 from that checkpoint and ends with the weights of an unbroken chain."""
    train, val, test = loaders
    teacher = make_mlp([32], seed=0)

    def students() -> list[torch.nn.Module]:
        return [make_mlp([16], seed=1), make_mlp([16], seed=2), make_mlp([8], seed=3)]

    options = {"test_loader": test, "epochs": 2, "progress": False}
    unbroken = students()
    distill_chain(teacher, unbroken, train, val, run_dir=tmp_path / "unbroken", **options)

    real_save = loop_module.save_checkpoint

    def save_then_die(root, epoch, *args, **kwargs):
        saved = real_save(root, epoch, *args, **kwargs)
        if Path(root).parent.name == "gen-2":
            raise StillroomError("injected failure")
        return saved

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    run_dir = tmp_path / "chain"
    with pytest.raises(GenerationFailed, match="generation 2 failed: injected failure") as failed:
        distill_chain(teacher, students(), train, val, run_dir=run_dir, **options)
    assert failed.value.stage == "generation 2"
    assert is_complete(run_dir / "gen-1") and not is_complete(run_dir / "gen-2")
    assert (run_dir / "gen-2" / "checkpoints" / "epoch-0001").is_dir()
    kept = tree_digest(run_dir / "gen-1")

    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    resumed = students()
    results = distill_chain(teacher, resumed, train, val, run_dir=run_dir, resume=True, **options)
    assert tree_digest(run_dir / "gen-1") == kept  # loaded, not retrained
    assert all(is_complete(run_dir / f"gen-{k}") for k in (1, 2, 3))
    assert len(results) == 3 and results[2].student is resumed[2]
    for ours, theirs in zip(resumed, unbroken, strict=True):
        for name, value in ours.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[name]), name
    done = json.loads((run_dir / "gen-3" / "done.json").read_text())
    assert 0.0 <= done["test"]["accuracy"] <= 1.0
    assert 0.0 <= done["test"]["agreement_teacher"] <= 1.0


def test_cached_targets_train_like_the_live_teacher(loaders, make_mlp) -> None:
    """The previous generation's outputs, computed once, are exactly what it gives live."""
    train, _, _ = loaders
    teacher = make_mlp([32], seed=0)
    weights = []
    for cache in (False, True):
        students = [make_mlp([16], seed=1), make_mlp([8], seed=2)]
        distill_chain(teacher, students, train, cache_targets=cache, epochs=1, progress=False)
        weights.append([s.net[1].weight.detach().clone() for s in students])
    for live, cached in zip(*weights, strict=True):
        torch.testing.assert_close(live, cached, rtol=1e-5, atol=1e-6)


def test_cli_chain_fails_mid_way_then_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "chain"
    recipe = RECIPES / "digits_born_again.yaml"
    failed = stillroom_in_process(
        "distill", recipe, *TINY, BROKEN, "--out", run_dir, "--no-progress"
    )
    assert_user_error(failed, "generation 2 failed: loss term")
    assert "generations 0-1 are complete" in failed.stderr and "--resume" in failed.stderr
    assert is_complete(run_dir / "gen-0") and is_complete(run_dir / "gen-1")
    assert not is_complete(run_dir / "gen-2") and not (run_dir / "results.json").exists()
    kept = {g: tree_digest(run_dir / g) for g in ("gen-0", "gen-1")}

    # a completed generation may not change on resume; the failed one may
    changed = load_method_recipe(recipe, [*TINY, "generations=[{kind: mlp, hidden: [8]}]"])[1]
    with pytest.raises(StillroomError, match=r"generations not complete yet \(generations\[1:\]\)"):
        run_chain(changed, run_dir, resume=True, progress=False)

    # the resume in this process: the CLI path is the one above, and a process start costs seconds
    fixed = load_method_recipe(recipe, [*TINY, FIXED])[1]
    result = run_chain(fixed, run_dir, resume=True, progress=False)
    assert {g: tree_digest(run_dir / g) for g in kept} == kept  # not retrained, not rewritten
    rows = json.loads((run_dir / "results.json").read_text())["models"]
    assert rows == json.loads(json.dumps(result.rows))
    assert list(rows) == ["gen-0", "gen-1", "gen-2", "scratch-gen-1", "scratch-gen-2"]
    # MLP 64 -> 16 -> 10 and 64 -> 8 -> 10 on 8x8 digits
    assert [rows[g]["parameters"] for g in ("gen-1", "gen-2")] == [1210, 610]
    assert rows["gen-2"]["teacher"] == "gen-1" and rows["gen-2"]["scratch"] == "scratch-gen-2"
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["size_bytes"] > 0
    for name in ("gen-1", "gen-2"):
        assert 0.0 <= rows[name]["agreement_teacher"] <= 1.0
        assert 0.0 <= rows[name]["agreement_gen0"] <= 1.0
    assert rows["gen-1"]["agreement_teacher"] == rows["gen-1"]["agreement_gen0"]
    done = json.loads((run_dir / "gen-2" / "done.json").read_text())
    assert done["test"]["accuracy"] == pytest.approx(rows["gen-2"]["accuracy"])
    assert "| gen-2 | generation | mlp 8 | gen-1 |" in (run_dir / "results.md").read_text()
    summary = read_summary(run_dir)
    assert summary.primary == "gen-2" and summary.model("gen-0").role == "teacher"
    console = Console(width=80, record=True)
    console.print(terminal_table(summary))
    assert "scratch-gen-2" in console.export_text()


@pytest.mark.parametrize("name", ["digits_born_again", "digits_ta_chain"])
def test_shipped_chain_recipes_run_small(name: str, tmp_path: Path) -> None:
    chain = load_method_recipe(RECIPES / f"{name}.yaml", TINY)[1]
    assert isinstance(chain, ChainRecipe)
    result = run_chain(chain, tmp_path / "run", progress=False)
    depth = len(chain.generations)
    assert [f"gen-{k}" for k in range(depth + 1)] == list(result.rows)[: depth + 1]
    widths = {tuple(g.hidden) for g in chain.generations}
    assert len(result.rows) == depth + 1 + len(widths)  # one scratch student per architecture
    for k in range(depth + 1):
        assert is_complete(tmp_path / "run" / f"gen-{k}")


def test_bad_chain_recipes(tmp_path: Path) -> None:
    recipe = RECIPES / "digits_born_again.yaml"
    loading = {
        "generations=[]": "generations: Value error, a chain needs at least one generation",
        "student.hidden=[8]": "names its students in 'generations'",
        "generations=[{kind: mlp, hiden: [8]}]": "unknown key 'generations.0.hiden'",
    }
    for override, message in loading.items():
        with pytest.raises(StillroomError, match=re.escape(message)) as bad:
            load_method_recipe(recipe, [override])
        assert len(str(bad.value).splitlines()) == 1
    with pytest.raises(StillroomError, match="generations: Field required"):
        load_method_recipe(None, ["method=born_again"])
    running = {
        "teacher.store=somewhere": "teacher.store: a chain computes",
        "distill.terms=[{kind: hint, student: net.9, teacher: net.1}]": "generations[0] (generation 1): MLP has no module named 'net.9'",
    }
    for override, message in running.items():
        chain = load_method_recipe(recipe, [override])[1]
        assert isinstance(chain, ChainRecipe)
        with pytest.raises(StillroomError, match=re.escape(message)):
            run_chain(chain, tmp_path / "never", progress=False)
        assert not (tmp_path / "never").exists()
