"""Recipes: every shipped recipe loads; bad values fail at load with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stillroom.config import dump_recipe, load_recipe
from stillroom.errors import StillroomError
from stillroom.methods import METHODS, load_method_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_recipes_folder_is_not_empty() -> None:
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    method, recipe = load_method_recipe(path)
    assert recipe.name == path.stem
    # the resolved form round-trips: what the run folder saves can be run again
    assert method.schema.model_validate(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_every_method_has_a_shipped_recipe() -> None:
    used = {yaml.safe_load(path.read_text()).get("method", "classic") for path in RECIPES}
    assert used == set(METHODS)


def test_an_unknown_method_is_one_line_error() -> None:
    with pytest.raises(StillroomError, match="unknown method 'bagging'; available: classic"):
        load_method_recipe(None, ["method=bagging"])


def test_defaults_are_the_digits_recipe() -> None:
    assert load_recipe(None) == load_recipe(RECIPES[0].parent / "digits.yaml")


def test_overrides_are_dotted_and_typed() -> None:
    recipe = load_recipe(
        None, ["distill.alpha=0.25", "student.hidden=[64, 16]", "teacher.train.patience=3"]
    )
    assert recipe.distill.alpha == 0.25
    assert recipe.student.hidden == [64, 16]
    assert recipe.teacher.train.patience == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["distill.alpah=0.5"], "unknown key 'distill.alpah'; did you mean 'alpha'?"),
        (
            ["distill.alpha=1.5"],
            "distill.alpha: Input should be less than or equal to 1 (given 1.5)",
        ),
        (
            ["data.source=imagenet"],
            "data.source: Input should be 'digits', 'diabetes', 'mnist', 'npz', 'csv'",
        ),
        (["distill.epochs=many"], "distill.epochs: Input should be a valid integer"),
        (["teacher.train.lr=0"], "teacher.train.lr: Input should be greater than 0 (given 0)"),
        (["alpha"], "override 'alpha' must look like key=value"),
        (["seed.x=1"], "seed: Input should be a valid integer"),
    ],
)
def test_bad_values_fail_with_the_field_path(overrides: list[str], expected: str) -> None:
    with pytest.raises(StillroomError) as info:
        load_recipe(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("student:\n  width: [8]\n")
    with pytest.raises(
        StillroomError,
        match=r"unknown key 'student.width'; did you mean 'widths'\?.*Allowed here: kind, hidden",
    ):
        load_recipe(path)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndistill:\n  alpha: [0.5\n")
    with pytest.raises(StillroomError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_recipe(path)


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(StillroomError, match="must be a mapping"):
        load_recipe(path)


def test_missing_recipe_file() -> None:
    with pytest.raises(StillroomError, match="does not exist"):
        load_recipe(Path("no/such/recipe.yaml"))


def test_every_method_schema_is_the_shared_base_with_no_nulled_section() -> None:
    """One schema style: each method composes RecipeBase with the sections it uses; none
    inherits a section only to set it to None."""
    from types import NoneType

    from stillroom.config import RecipeBase
    from stillroom.methods import METHODS

    for name, method in METHODS.items():
        assert issubclass(method.schema, RecipeBase), name
        assert method.schema.model_fields["method"].default == name
        for field, info in method.schema.model_fields.items():
            assert info.annotation is not NoneType, f"{name}.{field} is a nulled section"


def test_a_section_of_another_method_is_refused_with_what_to_do() -> None:
    from stillroom.config import validate_recipe
    from stillroom.methods import METHODS

    with pytest.raises(StillroomError, match="has no 'teacher' section: the network and its"):
        validate_recipe({"teacher": {}}, "r.yaml", METHODS["self_distill"].schema)
    with pytest.raises(StillroomError, match="lists its members under 'teachers'"):
        validate_recipe({"teacher": {}}, "r.yaml", METHODS["ensemble"].schema)
