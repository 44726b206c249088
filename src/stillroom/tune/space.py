"""The `tune:` section of a recipe: the search space over dotted recipe fields and the budget.

    tune:
      trials: 20                  # default for --trials
      space:
        distill.temperature: {low: 1.0, high: 10.0, log: true}
        distill.alpha: {low: 0.1, high: 0.99}
        distill.lr: {low: 0.001, high: 0.05, log: true}
        student.hidden: {choices: [[32], [64], [128]]}

A range takes the type of the field it varies (an int field draws ints, a float field floats); a
field that holds anything else (a list, a string) takes `choices` only. Every bound and choice is
validated as the recipe it would make before the first trial runs, so a range the recipe refuses
(alpha above 1) fails now, in one line.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stillroom.config import Recipe, _set_dotted, shorten, validate_recipe
from stillroom.errors import StillroomError

FIXED = ("name", "seed", "method", "cpu", "tune", "search", "baseline", "teacher", "data")
"""Fields a trial may not vary: every trial reads the one teacher store computed on one split of
the data with one seed (data.batch_size alone is the loader's, and may vary)."""
VARIABLE_DATA = ("data.batch_size",)


class Param(BaseModel):
    """One searched field: a range (low, high, optional log scale / step) or a list of choices."""

    model_config = ConfigDict(extra="forbid")

    low: float | None = Field(None, description="lower bound of a range (inclusive)")
    high: float | None = Field(None, description="upper bound of a range (inclusive)")
    log: bool = Field(False, description="draw the range on a log scale (low > 0)")
    step: float | None = Field(None, gt=0, description="grid step of the range (not with log)")
    choices: list[Any] | None = Field(None, min_length=1, description="categorical values")

    @model_validator(mode="after")
    def _range_or_choices(self) -> Param:
        is_range = self.low is not None or self.high is not None
        if is_range == (self.choices is not None):
            raise ValueError("give either low and high (a range) or choices (a list), not both")
        if is_range:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both low and high")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale range needs low > 0 (given {self.low})")
            if self.log and self.step is not None:
                raise ValueError("a range takes log or step, not both")
        return self


class TuneSection(BaseModel):
    """What `stillroom tune` searches and how (validated when tune reads the recipe)."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, Param] = Field(description="dotted recipe field -> its range or choices")
    trials: int = Field(20, ge=1, le=10_000, description="trials when --trials is not given")
    pruner: Literal["median", "none"] = Field(
        "median", description="stop a trial whose per-epoch val metric trails the median"
    )
    startup_trials: int = Field(
        5, ge=0, description="random trials before TPE models the space; none pruned before it"
    )
    warmup_epochs: int = Field(5, ge=0, description="epochs of each trial never pruned")
    seeds: int = Field(
        3, ge=1, le=20, description="seeds of the final comparison: tuned vs starting recipe"
    )


def split_tune(tree: dict[str, Any], source: str) -> tuple[TuneSection, dict[str, Any]]:
    """(the validated tune section, the recipe tree without it); one line on a bad section."""
    rest = copy.deepcopy(tree)
    raw = rest.pop("tune", None)
    rest.pop("search", None)
    if raw is None:
        raise StillroomError(
            f"{source}: no tune: section; add one with a space, e.g. tune: {{space: "
            "{distill.temperature: {low: 1, high: 10}}} (see recipes/digits_tune.yaml)"
        )
    method = rest.get("method", "classic")
    if method != "classic":
        raise StillroomError(
            f"{source}: stillroom tune supports method classic; this recipe is method {method!r}"
        )
    try:
        section = TuneSection.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in ("tune", *first["loc"]))
        given = shorten(repr(first.get("input")))
        raise StillroomError(f"{source}: {where}: {first['msg']} (given {given})") from None
    if not section.space:
        raise StillroomError(
            f"{source}: tune.space is empty: name at least one field to search, e.g. "
            "distill.temperature: {low: 1, high: 10}"
        )
    return section, rest


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    found = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        found[dotted] = value
        if isinstance(value, dict):
            found.update(_leaves(value, f"{dotted}."))
    return found


def field_kinds(
    space: dict[str, Param], base: Recipe, source: str, what: str = "tune.space"
) -> dict[str, Literal["int", "float", "choices"]]:
    """How each searched field is drawn; one line for a field that does not exist, may not vary,
    or is not numeric for a range."""
    leaves = _leaves(base.model_dump(mode="json"))
    kinds: dict[str, Literal["int", "float", "choices"]] = {}
    for name, param in space.items():
        if name not in leaves:
            close = difflib.get_close_matches(name, list(leaves), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise StillroomError(
                f"{source}: {what}: '{shorten(name)}' is not a field of the recipe{hint}"
            )
        if name.split(".")[0] in FIXED and name not in VARIABLE_DATA:
            raise StillroomError(
                f"{source}: {what}: '{name}' cannot vary between trials: every trial reads one "
                "teacher store computed once on one data split; search distill.* or student.*"
            )
        current = leaves[name]
        if param.choices is not None:
            kinds[name] = "choices"
        elif isinstance(current, bool) or not isinstance(current, int | float | None):
            raise StillroomError(
                f"{source}: {what}: '{name}' holds {shorten(repr(current))}, not a number; a "
                "range needs a numeric field: give it choices: [...] instead"
            )
        elif isinstance(current, int) and float(param.low).is_integer():  # type: ignore[arg-type]
            kinds[name] = "int"
        else:
            kinds[name] = "float"
    return kinds


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The recipe tree with each dotted field set to its value (a trial's recipe)."""
    out = copy.deepcopy(tree)
    for name, value in values.items():
        _set_dotted(out, name, value)
    return out


def check_bounds(
    space: dict[str, Param], kinds: dict[str, str], tree: dict[str, Any], source: str
) -> None:
    """Validate the recipe at every bound and choice: a range the recipe refuses fails now."""
    for name, param in space.items():
        values = param.choices if kinds[name] == "choices" else [param.low, param.high]
        for value in values or []:
            if kinds[name] == "int":
                value = int(value)
            validate_recipe(
                with_values(tree, {name: value}), f"{source} (tune.space {name})", Recipe
            )
