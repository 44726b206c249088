"""stillroom search: the student's shape under a budget, end to end on a tiny digits recipe (one
search shared by the tests that read it); a budget no candidate meets, on --resume, without
training again; the kill-and-resume of a search (slow); budget parsing; bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import stillroom_in_process, tree_digest
from stillroom.config import load_recipe
from stillroom.errors import StillroomError
from stillroom.tune import search
from stillroom.tune.search_costs import pareto_front
from stillroom.tune.search_space import Budget, parse_budget

TINY = {
    "name": "tiny_search",
    "data": {"source": "digits", "label_fraction": 0.1, "batch_size": 256},
    "teacher": {"kind": "mlp", "hidden": [32], "train": {"epochs": 1, "lr": 0.01}},
    "student": {"kind": "mlp", "hidden": [16]},
    "distill": {"epochs": 1, "lr": 0.01, "alpha": 0.9, "temperature": 4.0},
    "search": {
        "trials": 2,
        "epochs": 1,
        "population": 2,
        "seeds": 1,
        "repeats": 5,
        "batch": 4,
        "onnx": False,  # the ONNX exporter takes seconds per model: the slow test exports
        "runtime": "pytorch",
        "space": {"student.hidden": {"depth": [1, 2], "width": [4, 32]}},
    },
}


def _recipe(folder: Path, space: dict | None = None, **search_changes) -> Path:
    tree = json.loads(json.dumps(TINY))
    tree["search"].update(search_changes)
    if space is not None:
        tree["search"]["space"] = space
    path = folder / "tiny_search.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One search through the CLI: (recipe, run folder, stdout)."""
    folder = tmp_path_factory.mktemp("search")
    recipe, out = _recipe(folder), folder / "run"
    done = stillroom_in_process("search", recipe, "--budget", "params=100%", "--out", out)
    assert done.returncode == 0, done.stderr
    return recipe, out, done.stdout


def test_search_cli_writes_front_chosen_comparison_and_report(searched) -> None:
    _, out, stdout = searched
    for name in ("config.yaml", "study.db", "chosen_recipe.yaml", "front.md", "summary.json"):
        assert (out / name).is_file(), name
    assert "candidate 1 (1 of 2 done)" in stdout and "candidate 2 (2 of 2 done)" in stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["candidates"]) == 2 and "never the test split" in results["objective"]
    first = results["candidates"][0]
    assert first["starting_student"] and first["values"] == {"student.hidden": [16]}
    assert (out / "candidates" / "trial1" / "model.safetensors").is_file()  # the file it sized
    for key in ("parameters", "size_kb", "latency_ms", "pytorch_ms", "pytorch_ms_batch_4"):
        assert first["costs"][key] > 0, key
    chosen = next(c for c in results["candidates"] if c["number"] == results["chosen"])
    assert chosen["costs"]["parameters"] <= results["start_costs"]["parameters"] == results["limit"]
    assert (
        load_recipe(out / "chosen_recipe.yaml").student.hidden == chosen["values"]["student.hidden"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "search" and summary["primary"] == "student_kd (chosen)"
    assert {m["name"] for m in summary["models"]} == {
        "teacher",
        "student_scratch (starting)",
        "student_kd (starting)",
        "student_scratch (chosen)",
        "student_kd (chosen)",
    }
    assert (out / "figures" / "pareto.png").is_file()
    html = (out / "report" / "report.html").read_text()
    assert 'id="fig-pareto"' in html and "front: trial" in html
    front = (out / "front.md").read_text()
    assert all(f"| {n} |" in front for n in results["front"])


def test_unmeetable_budget_names_the_smallest_cost_and_keeps_the_study(
    searched, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stillroom.train

    recipe, out, _ = searched
    before = tree_digest(out)
    monkeypatch.setattr(stillroom.train, "distill", None)  # --resume trains no candidate again
    done = stillroom_in_process(
        "search", recipe, "--budget", "params=10", "--out", out, "--resume", "--no-progress"
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no candidate meets --budget params<=10" in done.stderr
    assert "the smallest params reached is" in done.stderr
    after = tree_digest(out)
    assert {k: v for k, v in after.items() if k != "study.db"} == {
        k: v for k, v in before.items() if k != "study.db"
    }
    study = optuna.load_study(
        study_name="tiny_search.params", storage=f"sqlite:///{out / 'study.db'}"
    )
    assert len(study.trials) == 2


@pytest.mark.slow
def test_killed_search_resumes_without_repeating_finished_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stillroom.train

    real, calls = stillroom.train.distill, []

    def interrupted_second_candidate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out, recipe = tmp_path / "run", _recipe(tmp_path, trials=3, onnx=True, runtime="onnxruntime")
    monkeypatch.setattr(stillroom.train, "distill", interrupted_second_candidate)
    with pytest.raises(KeyboardInterrupt):
        search(recipe, run_dir=out, budget="latency_ms=200%", progress=False)
    monkeypatch.setattr(stillroom.train, "distill", real)
    storage = f"sqlite:///{out / 'study.db'}"
    first = optuna.load_study(study_name="tiny_search.latency_ms", storage=storage).trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    result = search(recipe, run_dir=out, budget="latency_ms=200%", resume=True, progress=False)
    trials = optuna.load_study(study_name="tiny_search.latency_ms", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 == result.trials and "RUNNING" not in states
    assert trials[0].params == first.params and trials[0].values == first.values
    assert (out / "candidates" / "trial3" / "model.onnx").is_file()  # the file it was timed as
    assert "ONNX Runtime ms b1" in (out / "front.md").read_text()


def test_budget_parsing() -> None:
    assert parse_budget("params=5000") == Budget("params", 5000.0)
    assert parse_budget("latency_ms<=0.05") == Budget("latency_ms", 0.05)
    assert parse_budget(" size_kb = 20 ") == Budget("size_kb", 20.0)
    relative = parse_budget("latency_ms=50%")
    assert relative == Budget("latency_ms", 50.0, relative=True)
    assert relative.resolved({"latency_ms": 0.4}) == pytest.approx(0.2)
    assert relative.text() == "latency_ms<=50%"
    for bad, message in {
        "latency=5": "unknown cost 'latency'",
        "params": "is not cost=limit",
        "params=abc": "is not cost=limit",
        "params=0": "above 0",
        "size_kb=1e999": "above 0",
        "params=1.2.3": "is not a number",
        "": "is not cost=limit",
    }.items():
        with pytest.raises(StillroomError, match=message):
            parse_budget(bad)


def test_pareto_front_keeps_only_undominated_points_cheapest_first() -> None:
    rows = [
        {"value": v, "costs": {"parameters": c}}
        for v, c in [(0.9, 100), (0.8, 50), (0.85, 120), (0.95, 300), (0.8, 60)]
    ]
    front = pareto_front(rows, "parameters", maximize=True)
    assert [(r["value"], r["costs"]["parameters"]) for r in front] == [
        (0.8, 50),
        (0.9, 100),
        (0.95, 300),
    ]
    low = pareto_front(rows, "parameters", maximize=False)  # rmse: lower is better
    assert [r["costs"]["parameters"] for r in low] == [50]


def test_bad_search_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = {
        "empty": ({}, [], "search.space is empty"),
        "range": ({"student.hidden": {"low": 8, "high": 64}}, [], "not a number"),
        "typo": ({"student.hiden": {"choices": [[8]]}}, [], "did you mean 'student.hidden'"),
        "teacher": ({"distill.alpha": {"low": 0.1, "high": 0.9}}, [], "not a student field"),
        "layers": ({"student.hidden": {"depth": [3, 1], "width": [8, 16]}}, [], "depth"),
        "notlist": ({"student.dropout": {"depth": [1, 2], "width": [8, 16]}}, [], "not a list"),
        "syntax": (None, ["--budget", "latency=5"], "unknown cost 'latency'"),
        "number": (None, ["--budget", "params=many"], "is not cost=limit"),
    }
    for name, (space, extra, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        done = stillroom_in_process(
            "search", _recipe(folder, space), *extra, "--out", folder / "run", "--no-progress"
        )
        assert done.returncode == 2, (name, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (folder / "run").exists(), name


def test_a_study_of_another_recipe_is_refused_and_kept(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    other = optuna.create_study(study_name="tiny_search.params", storage=storage)
    other.set_user_attr("stillroom_recipe_hash", "0123456789abcdef")
    other.enqueue_trial({"x": 1.0})
    done = stillroom_in_process(
        "search", _recipe(tmp_path), "--budget", "params=5000", "--storage", storage,
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert done.returncode == 2 and "made by a different recipe" in done.stderr, done.stderr
    kept = optuna.load_study(study_name="tiny_search.params", storage=storage)
    assert kept.user_attrs["stillroom_recipe_hash"] == "0123456789abcdef"
    assert len(kept.trials) == 1 and not (tmp_path / "run").exists()


def test_shipped_search_recipe_space_is_valid() -> None:
    from stillroom.config import Recipe, read_recipe_tree, validate_recipe
    from stillroom.tune.search_space import check_space, space_kinds, split_search

    path = Path(__file__).parent.parent / "recipes" / "digits_search.yaml"
    tree, source = read_recipe_tree(path)
    section, rest = split_search(tree, source)
    kinds = space_kinds(section, validate_recipe(rest, source, Recipe), source)
    check_space(section, kinds, rest, source)
    assert kinds == {
        "student.kind": "choices",
        "student.hidden": "layers",
        "student.channels": "layers",
    }
    assert load_recipe(path).search is not None
