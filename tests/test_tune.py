"""stillroom tune: a study over a recipe's tune.space, end to end on a tiny digits recipe; the
kill-and-resume of a study; two workers on one storage (slow); bad input as one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import stillroom_in_process
from stillroom.config import load_recipe
from stillroom.errors import StillroomError
from stillroom.tune import tune

TINY = {
    "name": "tiny_tune",
    "data": {"source": "digits", "label_fraction": 0.1, "batch_size": 256},
    "teacher": {"kind": "mlp", "hidden": [32], "train": {"epochs": 1, "lr": 0.01}},
    "student": {"kind": "mlp", "hidden": [16]},
    "distill": {"epochs": 2, "lr": 0.01, "alpha": 0.9, "temperature": 4.0},
    "tune": {
        "trials": 2,
        "seeds": 1,
        "startup_trials": 1,
        "warmup_epochs": 0,
        "space": {
            "distill.temperature": {"low": 1.0, "high": 8.0, "log": True},
            "distill.alpha": {"low": 0.1, "high": 0.99},
            "student.hidden": {"choices": [[8], [16]]},
        },
    },
}


def _recipe(tmp_path: Path, **tune_changes) -> Path:
    tree = json.loads(json.dumps(TINY))
    tree["tune"].update(tune_changes)
    path = tmp_path / "tiny_tune.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_tune_cli_writes_study_best_recipe_comparison_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = stillroom_in_process("tune", _recipe(tmp_path), "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    for name in ("config.yaml", "study.db", "best_recipe.yaml", "summary.json", "results.md"):
        assert (out / name).is_file(), name
    assert (out / "store" / "manifest.json").is_file()  # the teacher cached once
    results = json.loads((out / "results.json").read_text())
    assert results["trials"] == 2 and len(results["trial_list"]) == 2
    assert "never the test split" in results["objective"]
    best = load_recipe(out / "best_recipe.yaml")  # a plain recipe, ready for `distill`
    assert best.distill.temperature == pytest.approx(results["best_params"]["distill.temperature"])
    assert best.student.hidden == results["best_params"]["student.hidden"]
    assert best.tune is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tune"
    assert {m["name"] for m in summary["models"]} >= {
        "teacher",
        "student_kd (starting recipe)",
        "student_kd (tuned)",
    }
    assert (out / "figures" / "history.png").is_file()
    assert (out / "figures" / "temperature_alpha.png").is_file()
    html = (out / "report" / "report.html").read_text()
    assert 'id="fig-history"' in html and 'id="fig-temperature_alpha"' in html
    # a tune run folder is refused without --resume / --force, like every run folder
    again = stillroom_in_process("tune", _recipe(tmp_path), "--out", out, "--no-progress")
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_killed_study_resumes_without_repeating_finished_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stillroom.train

    real, calls = stillroom.train.distill, []

    def interrupted_second_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second trial's training: Ctrl-C (or a kill)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out, recipe = tmp_path / "run", _recipe(tmp_path, seeds=1)
    monkeypatch.setattr(stillroom.train, "distill", interrupted_second_trial)
    with pytest.raises(KeyboardInterrupt):
        tune(recipe, run_dir=out, progress=False)
    monkeypatch.setattr(stillroom.train, "distill", real)
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="tiny_tune", storage=storage)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    study.ask()  # a trial a killed worker left "running"

    result = tune(recipe, run_dir=out, resume=True, progress=False)
    trials = optuna.load_study(study_name="tiny_tune", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 2 == result.trials
    assert "RUNNING" not in states  # the killed worker's trial is marked failed, not waited for
    assert trials[0].params == first.params and trials[0].value == first.value  # not repeated


def test_bad_tune_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = {
        "space": ({}, "tune.space is empty"),
        "typo": (
            {"distill.temprature": {"low": 1, "high": 2}},
            "did you mean 'distill.temperature'",
        ),
        "list": ({"student.hidden": {"low": 8, "high": 64}}, "not a number"),
        "fixed": ({"data.label_fraction": {"low": 0.1, "high": 0.2}}, "cannot vary"),
        "bound": ({"distill.alpha": {"low": 0.5, "high": 1.5}}, "distill.alpha"),
    }
    for name, (space, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        done = stillroom_in_process(
            "tune", _recipe(folder, space=space), "--out", folder / "run", "--no-progress"
        )
        assert done.returncode == 2, (name, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (folder / "run").exists(), name
    bad_url = stillroom_in_process(
        "tune", _recipe(tmp_path), "--storage", "nosuchdb://x", "--out", tmp_path / "run"
    )
    assert bad_url.returncode == 2 and "cannot open the study storage" in bad_url.stderr
    assert not (tmp_path / "run").exists()


def test_a_study_of_another_recipe_is_refused_and_kept(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    other = optuna.create_study(study_name="tiny_tune", storage=storage)
    other.set_user_attr("stillroom_recipe_hash", "0123456789abcdef")
    other.enqueue_trial({"x": 1.0})
    with pytest.raises(StillroomError, match="made by a different recipe"):
        tune(_recipe(tmp_path), run_dir=tmp_path / "run", storage=storage, progress=False)
    kept = optuna.load_study(study_name="tiny_tune", storage=storage)
    assert kept.user_attrs["stillroom_recipe_hash"] == "0123456789abcdef"
    assert len(kept.trials) == 1 and not (tmp_path / "run").exists()


def test_shipped_tune_recipe_space_is_valid() -> None:
    from stillroom.config import Recipe, read_recipe_tree, validate_recipe
    from stillroom.tune.space import check_bounds, field_kinds, split_tune

    path = Path(__file__).parent.parent / "recipes" / "digits_tune.yaml"
    tree, source = read_recipe_tree(path)
    section, rest = split_tune(tree, source)
    kinds = field_kinds(section.space, validate_recipe(rest, source, Recipe), source)
    check_bounds(section.space, kinds, rest, source)
    assert {"distill.temperature", "distill.alpha", "distill.lr"} <= set(kinds)


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, trials=8)
    result = tune(recipe, ["distill.epochs=6"], run_dir=out, workers=2, progress=False)
    study = optuna.load_study(study_name="tiny_tune", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 8 and result.trials == len(finished)
    assert {t.user_attrs["worker"] for t in finished} == {0, 1}  # both processes ran trials
