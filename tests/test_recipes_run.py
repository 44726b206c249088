"""Every shipped classic recipe runs end to end, made small (one epoch per phase). Recipes of the
other methods run small in their own test files (test_ensemble.py, test_born_again.py, ...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stillroom.config import load_recipe
from stillroom.methods.classic import run_recipe

RECIPES = [
    path
    for path in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    if yaml.safe_load(path.read_text()).get("method", "classic") == "classic"
    # own_*.yaml read the files examples/make_data.py writes; test_own_data.py runs the same
    # sources on data the tests generate
    and not path.stem.startswith("own_")
    # the MNIST recipe needs the mnist extra; test_hinton_mnist.py runs it small through the CLI
    and path.stem != "hinton_mnist"
]
SMALL = ["teacher.train.epochs=1", "distill.epochs=1"]
NARROW = {
    # the 175k-parameter ResNet teacher costs a minute an epoch on 2 cores: the same layers and
    # terms, narrower (test_cli.py runs this recipe through the CLI at the same size)
    "digits_resnet": [
        "teacher.widths=[8, 16, 16]",
        "teacher.blocks=[1, 1, 1]",
        "data.batch_size=256",
    ]
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_small(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path, [*SMALL, *NARROW.get(path.stem, [])])
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    assert set(result.rows) >= {"teacher", "student_kd"}
    record = json.loads(
        (tmp_path / "run" / "student_kd" / "metrics.jsonl").read_text().splitlines()[0]
    )
    # every term the recipe declares is trained and logged
    for term in recipe.distill.terms:
        assert any(key.startswith(f"train/{term.kind}") for key in record), term.kind
