"""The `search:` section of a recipe (what `stillroom search` varies of the student) and the
`--budget` it picks a candidate under.

    search:
      trials: 16                  # default for --trials
      epochs: 15                  # each candidate's short schedule (the full one: distill.epochs)
      space:
        student.kind: {choices: [mlp, cnn]}
        student.hidden: {depth: [1, 2], width: [8, 128]}         # [w] * depth, w on a log scale
        student.channels: {depth: [1, 2], width: [4, 32], growth: 2}   # [w, 2w, ...]

A field of the space is a range or a list of choices (as in `tune.space`), or a layer list drawn
as a depth and a width (widths, channels, blocks). Only student.* fields vary: every candidate
is distilled from the one teacher store computed once.

    --budget params=5000 | latency_ms=0.05 | size_kb=20 | latency_ms=50%

COSTS is the one table of costs a budget may name; `N%` is that share of the starting student's
cost (measured the same way as every candidate's).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stillroom.config import Recipe, shorten, validate_recipe
from stillroom.errors import StillroomError
from stillroom.tune.search_costs import RUNTIMES
from stillroom.tune.space import Param, field_kinds, with_values


@dataclass(frozen=True)
class Cost:
    """One row of COSTS: the candidate's measured number it reads, and how it is shown."""

    key: str
    unit: str
    label: str


COSTS: dict[str, Cost] = {
    "params": Cost("parameters", "", "parameters"),
    "latency_ms": Cost("latency_ms", "ms", "latency (ms, batch 1)"),
    "size_kb": Cost("size_kb", "KB", "size of the exported file (KB = 1024 bytes)"),
}
"""What a budget may bound, by the name it takes on the command line."""


Runtime = Literal["onnxruntime", "pytorch"]
assert get_args(Runtime) == tuple(RUNTIMES)


class Layers(BaseModel):
    """A list-of-widths field drawn as a depth and a width: [w, w*growth, w*growth**2, ...]."""

    model_config = ConfigDict(extra="forbid")

    depth: tuple[int, int] = Field(description="[lowest, highest] number of layers (or stages)")
    width: tuple[int, int] = Field(description="[lowest, highest] width of the first layer")
    log: bool = Field(True, description="draw the width on a log scale")
    growth: float = Field(1.0, gt=0, le=8, description="each next layer's width over the last's")

    @model_validator(mode="after")
    def _ordered(self) -> Layers:
        for name, (low, high) in (("depth", self.depth), ("width", self.width)):
            if not 1 <= low <= high:
                raise ValueError(f"{name} [{low}, {high}] needs 1 <= lowest <= highest")
        return self

    def widths(self, depth: int, width: int) -> list[int]:
        return [max(1, round(width * self.growth**i)) for i in range(depth)]

    def bounds(self) -> list[list[int]]:
        """The extreme lists: every other draw lies between them."""
        return [self.widths(d, w) for d in self.depth for w in self.width]


class SearchSection(BaseModel):
    """What `stillroom search` varies and how it measures (validated when search reads the
    recipe)."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, Param | Layers] = Field(description="student.* field -> its values")
    trials: int = Field(16, ge=1, le=10_000, description="candidates when --trials is not given")
    epochs: int = Field(15, ge=1, le=1_000_000, description="each candidate's short schedule")
    population: int = Field(8, ge=2, le=1000, description="NSGA-II population per generation")
    onnx: bool = Field(
        True,
        description="export each candidate to ONNX (its size_kb, and ONNX Runtime timed beside "
        "PyTorch); false: size_kb of its safetensors weights, PyTorch timed alone",
    )
    runtime: Runtime = Field(
        "onnxruntime", description="whose batch-1 latency a latency_ms budget bounds"
    )
    batch: int = Field(64, ge=2, le=65_536, description="the stated larger batch also timed")
    repeats: int = Field(100, ge=5, le=100_000, description="timed calls at batch 1 (median)")
    threads: int = Field(
        1,
        ge=1,
        le=256,
        description="intra-op threads while timing (training: the recipe's threads)",
    )
    seeds: int = Field(
        3, ge=1, le=20, description="seeds of the final comparison on the test split"
    )

    @model_validator(mode="after")
    def _runtime_measured(self) -> SearchSection:
        if self.runtime == "onnxruntime" and not self.onnx:
            raise ValueError(
                "runtime onnxruntime times the ONNX file: set onnx: true, or runtime: pytorch"
            )
        return self


def split_search(tree: dict[str, Any], source: str) -> tuple[SearchSection, dict[str, Any]]:
    """(the validated search section, the recipe tree without tune/search); one line on a bad
    section."""
    rest = copy.deepcopy(tree)
    raw = rest.pop("search", None)
    rest.pop("tune", None)
    if raw is None:
        raise StillroomError(
            f"{source}: no search: section; add one with a space, e.g. search: {{space: "
            "{student.hidden: {depth: [1, 2], width: [8, 128]}}} (see recipes/digits_search.yaml)"
        )
    method = rest.get("method", "classic")
    if method != "classic":
        raise StillroomError(
            f"{source}: stillroom search supports method classic; this recipe is method {method!r}"
        )
    if not isinstance(raw, dict):
        raise StillroomError(f"{source}: search: must be a section (given {shorten(repr(raw))})")
    space_raw = raw.get("space")
    if isinstance(space_raw, dict) and not space_raw:
        raise StillroomError(
            f"{source}: search.space is empty: name at least one student field, e.g. "
            "student.hidden: {depth: [1, 2], width: [8, 128]}"
        )
    space: dict[str, Param | Layers] = {}
    for name, entry in (space_raw or {}).items() if isinstance(space_raw, dict) else ():
        model = Layers if isinstance(entry, dict) and {"depth", "width"} & set(entry) else Param
        space[name] = _validated(model, entry, ("search", "space", name), source)
    section = _validated(SearchSection, {**raw, "space": space or space_raw}, ("search",), source)
    return section, rest


def _validated(model: type[Any], value: Any, where: tuple[str, ...], source: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(p) for p in (*where, *first["loc"]))
        given = shorten(repr(first.get("input")))
        raise StillroomError(f"{source}: {path}: {first['msg']} (given {given})") from None


def space_kinds(section: SearchSection, base: Recipe, source: str) -> dict[str, str]:
    """How each field is drawn: int / float / choices (as tune's), or layers; one line for a
    field that is not the student's, does not exist, or is not numeric for a range."""
    for name in section.space:
        if not name.startswith("student."):
            raise StillroomError(
                f"{source}: search.space: '{shorten(name)}' is not a student field; search varies "
                "the student's shape (student.kind, student.hidden, ...); tune the rest with "
                "stillroom tune"
            )
    plain = {n: p for n, p in section.space.items() if isinstance(p, Param)}
    kinds: dict[str, str] = dict(field_kinds(plain, base, source, "search.space"))
    current = base.student.model_dump(mode="json")
    for name, param in section.space.items():
        if isinstance(param, Layers):
            field = name.removeprefix("student.")
            if not isinstance(current.get(field), list):
                raise StillroomError(
                    f"{source}: search.space: '{name}' holds {shorten(repr(current.get(field)))}"
                    ", not a list of widths; depth/width draws a list (student.hidden, "
                    "student.channels, student.widths, student.blocks)"
                )
            kinds[name] = "layers"
    return kinds


def check_space(
    section: SearchSection, kinds: dict[str, str], tree: dict[str, Any], source: str
) -> None:
    """Validate the recipe at every bound and choice (a value the recipe refuses fails now)."""
    for name, param in section.space.items():
        if isinstance(param, Layers):
            values: list[Any] = param.bounds()
        elif kinds[name] == "choices":
            values = list(param.choices or [])
        else:
            values = [param.low, param.high]
            values = [int(v) for v in values] if kinds[name] == "int" else values
        for value in values:
            validate_recipe(
                with_values(tree, {name: value}), f"{source} (search.space {name})", Recipe
            )


# --- the budget ----------------------------------------------------------------------------------

_BUDGET = re.compile(r"^\s*([a-z_]+)\s*(?:<=|=)\s*([0-9.eE+-]+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Budget:
    """`cost <= limit`; `relative`: limit is that percentage of the starting student's cost."""

    cost: str
    limit: float
    relative: bool = False

    def resolved(self, start_costs: dict[str, float]) -> float:
        key = COSTS[self.cost].key
        return self.limit / 100.0 * start_costs[key] if self.relative else self.limit

    def text(self) -> str:
        return f"{self.cost}<={self.limit:g}{'%' if self.relative else ''}"


def parse_budget(text: str) -> Budget:
    """`params=N`, `latency_ms=X`, `size_kb=Y` (or `<=`), a limit > 0, or `X%` of the starting
    student's cost; one line naming what is wrong otherwise."""
    example = (
        "give one of " + ", ".join(f"{name}=N" for name in COSTS) + " (or e.g. latency_ms=50%)"
    )
    match = _BUDGET.match(text or "")
    if match is None:
        raise StillroomError(f"--budget {shorten(repr(text))} is not cost=limit: {example}")
    cost, number, percent = match.groups()
    if cost not in COSTS:
        raise StillroomError(f"--budget: unknown cost {cost!r}: {example}")
    try:
        limit = float(number)
    except ValueError:
        raise StillroomError(f"--budget {cost}: {number!r} is not a number: {example}") from None
    if not math.isfinite(limit) or limit <= 0:
        raise StillroomError(
            f"--budget {cost}: the limit must be a number above 0 (given {number})"
        )
    return Budget(cost, limit, bool(percent))
