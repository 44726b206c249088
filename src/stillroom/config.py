"""The recipe schema: typed, flat sections validated at load, from YAML and `key=value` overrides.

Every bad value fails at load with one line naming the field's path, what was given and what is
allowed. Builders (`Recipe.teacher_spec`, `train_args`, ...) turn sections into plain arguments:
losses, models and the loop never see a config object.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stillroom.data.section import DataSection
from stillroom.errors import StillroomError
from stillroom.objective import (
    DEFAULT_TEMPERATURE,
    OUTPUT_KINDS,
    SPECS,
    AnyTermSpec,
    DkdSpec,
    field_default,
    spec_problem,
)
from stillroom.train.args import TrainArgs
from stillroom.yaml_safe import MAX_RECIPE_BYTES, safe_yaml, shorten

SchemaT = TypeVar("SchemaT", bound=BaseModel)

MAX_WIDTH = 1 << 16
"""The widest layer (hidden width, channels) a recipe may ask for: wider would not fit in memory
next to any realistic input."""
MAX_LAYERS = 64
MAX_SEED = 2**32 - 1
"""Seeds go to numpy as well as torch: numpy takes 0 .. 2**32 - 1."""
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Widths = Annotated[list[Width], Field(max_length=MAX_LAYERS)]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


MODEL_KINDS = ("mlp", "cnn", "resnet", "factory", "hf", "onnx", "sklearn")
"""What a recipe's teacher or student may be: rows of stillroom.models.MODELS (a test holds them
together). onnx and sklearn are frozen teachers from other frameworks, never students; hf is a
transformers image classifier folder, trained here like the built-in families."""
FROZEN_KINDS = ("onnx", "sklearn")
PATH_KINDS = ("hf", *FROZEN_KINDS)
"""Kinds read from `path`."""


class ModelSection(_Section):
    kind: Literal[MODEL_KINDS] = Field(  # type: ignore[valid-type]
        "mlp",
        description="a built-in family (mlp, cnn, resnet); factory: your own nn.Module; hf: a "
        "transformers image classifier folder (trained here from its weights); onnx / sklearn: a "
        "teacher from another framework (a .onnx file, or an estimator saved with skops)",
    )
    hidden: Widths = Field(
        [64], description="widths of the fully connected hidden layers (mlp, cnn)"
    )
    channels: Widths = Field([32, 64], description="conv channels per block (cnn only)")
    widths: Widths = Field([16, 32, 64], description="channels per stage (resnet only)")
    blocks: Annotated[list[Annotated[int, Field(ge=1, le=MAX_LAYERS)]], Field(max_length=16)] = (
        Field([1, 1, 1], description="residual blocks per stage (resnet only)")
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after hidden layers (mlp, cnn)")
    factory: str | None = Field(
        None,
        description="kind factory: module:function (or class) returning your nn.Module, looked up "
        "in the recipe's folder, then the current directory, then installed packages",
    )
    kwargs: dict[str, Any] = Field(
        {},
        description="kind factory: keyword arguments for it (input_shape and num_outputs are "
        "added from the data when it declares them)",
    )
    path: Path | None = Field(
        None,
        description="kind hf: the folder save_pretrained wrote (config.json, model.safetensors "
        "when it has weights); onnx: the .onnx file; sklearn: the .skops file",
    )
    search_paths: list[Path] = Field(
        [],
        description="kind factory: folders searched first for its module (the recipe's is added)",
    )
    new_head: bool = Field(
        False,
        description="kind hf: replace the folder's classification head by a fresh one sized for "
        "the data's classes (a pretrained backbone, e.g. with ImageNet's 1000 labels, trained "
        "here on yours)",
    )

    @model_validator(mode="after")
    def _kind_has_its_fields(self) -> ModelSection:
        if self.kind == "factory" and not self.factory:
            raise ValueError("kind 'factory' needs factory: module:function, e.g. my_models:build")
        if self.kind in PATH_KINDS and self.path is None:
            what = "the transformers folder" if self.kind == "hf" else "the model file"
            raise ValueError(f"kind '{self.kind}' needs path: {what}")
        if self.kind != "factory" and (self.factory or self.kwargs):
            raise ValueError(f"factory/kwargs are for kind 'factory', not '{self.kind}'")
        if self.new_head and self.kind != "hf":
            raise ValueError(
                f"new_head is for kind 'hf' (a transformers folder), not '{self.kind}'"
            )
        return self

    def spec(self) -> dict[str, Any]:
        """The JSON-able spec `stillroom.models.build_model` takes."""
        if self.kind == "resnet":
            return {"kind": "resnet", "widths": self.widths, "blocks": self.blocks}
        if self.kind == "factory":
            paths = [str(p.resolve()) for p in self.search_paths]
            return {
                "kind": "factory",
                "factory": self.factory,
                "kwargs": self.kwargs,
                "search_paths": paths,
            }
        if self.kind in PATH_KINDS:
            assert self.path is not None
            spec = {"kind": self.kind, "path": str(self.path.resolve())}
            return {**spec, "new_head": True} if self.new_head else spec
        spec: dict[str, Any] = {"kind": self.kind, "hidden": self.hidden, "dropout": self.dropout}
        if self.kind == "cnn":
            spec["channels"] = self.channels
        return spec


class TrainSection(_Section):
    epochs: int = Field(30, ge=1, le=1_000_000)
    lr: float = Field(3e-3, gt=0, le=1e6, allow_inf_nan=False)
    weight_decay: float = Field(1e-4, ge=0, le=1e6, allow_inf_nan=False)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="optimizer sgd: momentum")
    nesterov: bool = Field(True, description="optimizer sgd: Nesterov momentum")
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=10**9)
    patience: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="stop after this many epochs without a better val metric",
    )
    keep: Literal["best", "last"] = Field(
        "best", description="the weights a phase returns: its best validation epoch, or its last"
    )
    max_norm: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="after each step, scale every unit's incoming weights (rows of each linear "
        "layer) back to this L2 norm when larger (Hinton et al. 2012's max-norm constraint)",
    )
    grad_accum_steps: int = Field(1, ge=1, le=1_000_000)
    max_grad_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    @model_validator(mode="after")
    def _settings_fit_together(self) -> TrainSection:
        if self.keep == "last" and self.patience is not None:
            raise ValueError(
                "keep: last returns the final epoch, patience would stop before it at a worse "
                "one; drop one of them"
            )
        if self.nesterov and self.momentum == 0 and self.optimizer == "sgd":
            raise ValueError("nesterov needs momentum > 0; set nesterov: false or a momentum")
        return self


class TeacherSection(ModelSection):
    kind: Literal[MODEL_KINDS] = "cnn"  # type: ignore[valid-type]
    hidden: Widths = [128]
    checkpoint: Path | None = Field(
        None,
        description="a folder with model.json + model.safetensors written by stillroom (e.g. the "
        "teacher/ folder of an earlier run): load this teacher instead of training one",
    )
    store: Path | None = Field(
        None,
        description="a soft-target store written by `stillroom cache` for this teacher and data: "
        "the distilled student reads the teacher's outputs from it instead of computing them",
    )
    train: TrainSection = TrainSection(epochs=20)


TermSection = AnyTermSpec
"""One extra weighted term of the objective: the spec class of its `kind` (stillroom.objective.SPECS;
each kind's fields and defaults are declared there, once)."""


class DistillSection(TrainSection):
    epochs: int = Field(60, ge=1, le=1_000_000)
    lr: float = Field(1e-2, gt=0, le=1e6, allow_inf_nan=False)
    alpha: float = Field(
        0.9, ge=0, le=1, description="weight of the distillation term; 1 - alpha weights the labels"
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, le=1e6, allow_inf_nan=False)
    loss: Literal[OUTPUT_KINDS] = Field(  # type: ignore[valid-type]
        "soft_target", description="the output distillation term weighted by alpha"
    )
    dkd_alpha: float = Field(
        field_default(DkdSpec, "dkd_alpha"), ge=0, description="loss dkd: weight of the TCKD term"
    )
    dkd_beta: float = Field(
        field_default(DkdSpec, "dkd_beta"), ge=0, description="loss dkd: weight of the NCKD term"
    )
    terms: list[TermSection] = Field(
        [],
        description="extra weighted terms: hint, attention_transfer, hidden_state, attention_map, "
        "rkd_*, dkd, token_kl, adversarial",
    )


class RecipeBase(_Section):
    """What the recipe of every method has. Each method's schema is this base plus the sections
    it uses (composed from the shared ones below where it can), and its own `method` Literal;
    `stillroom.methods.METHODS` maps the name to the schema."""

    name: str = Field(description="the run's name: its default folder is runs/<name>")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of data splits, initialisation and batch order"
    )
    cpu: bool = Field(False, description="force the CPU even when an accelerator is present")
    threads: int | Literal["auto"] = Field(
        "auto",
        description="CPU threads for torch: auto (the idle cores, at most 8; OMP_NUM_THREADS "
        "wins) or a number, clamped to 1..cores; `--threads` overrides; may change on --resume",
    )

    absent: ClassVar[dict[str, str]] = {}
    """Sections other methods have and this one does not: key -> why, and what to do instead."""

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        # runs/<name> must stay inside runs/: no separators, no "..", no absolute path
        if not NAME_PATTERN.fullmatch(name) or name.strip(".") == "":
            raise ValueError(
                f"name {shorten(repr(name), 60)} must be a plain folder name (letters, digits, "
                "'.', '_', '+', '-'; at most 100 characters), not a path: choose the folder with "
                "--out"
            )
        return name

    @model_validator(mode="before")
    @classmethod
    def _no_foreign_sections(cls, tree: Any) -> Any:
        if isinstance(tree, dict):
            for key, why in cls.absent.items():
                if key in tree:
                    raise ValueError(why)
        return tree

    def train_args(self, section: TrainSection, task: str, **extra: Any) -> TrainArgs:
        """Plain TrainArgs for the loop from a training section (teacher.train or distill)."""
        fields = section.model_dump(exclude={"terms"})
        if isinstance(section, DistillSection):
            # the validated sections are the specs; an unset temperature is the run's
            fields["terms"] = tuple(section.terms)
        fields.update(extra)
        return TrainArgs(**fields, task=task, seed=self.seed, cpu=self.cpu)


class Recipe(RecipeBase):
    """The classic experiment: a teacher, a student distilled from it, and the same student from
    labels alone. The defaults are the demo's digits setting."""

    method: Literal["classic"] = Field(
        "classic", description="the workflow: see `stillroom methods` / stillroom.methods.METHODS"
    )
    name: str = "digits"
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    student: ModelSection = ModelSection()
    distill: DistillSection = DistillSection()
    baseline: bool = Field(
        True, description="also train the student on labels alone, for comparison"
    )
    baseline_equal_steps: bool = Field(
        False,
        description="with few labels, train the scratch student (labelled samples only) for as "
        "many optimizer steps as the distilled one (its epochs scaled by all / labelled samples)",
    )
    tune: dict[str, Any] | None = Field(
        None,
        description="what `stillroom tune` searches (validated there: stillroom.tune.TuneSection);"
        " distill ignores it",
    )
    search: dict[str, Any] | None = Field(
        None,
        description="what `stillroom search` varies of the student (validated there: "
        "stillroom.tune.SearchSection); distill ignores it",
    )

    @model_validator(mode="after")
    def _student_trains(self) -> Recipe:
        check_student_trains(self.student)
        if self.teacher.kind in FROZEN_KINDS and self.teacher.checkpoint:
            raise ValueError(
                f"teacher.kind '{self.teacher.kind}' reads teacher.path; drop teacher.checkpoint"
            )
        return self


def check_student_trains(student: ModelSection) -> None:
    if student.kind in FROZEN_KINDS:
        raise ValueError(
            f"student.kind '{student.kind}' is a frozen model from another framework; a student "
            "must train: use mlp, cnn, resnet, hf (a transformers folder) or your own factory"
        )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise StillroomError(
                f"override {shorten(dotted)}: '{shorten(key)}' holds a value, not a section"
            )
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings (values parsed as YAML: 0.5, true, [64, 32], null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StillroomError(
                f"override {shorten(repr(item))} must look like key=value, e.g. distill.alpha=0.5"
            )
        try:
            value = safe_yaml(raw, f"override {key.strip()}") if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if any(not part.strip() for part in key.strip().split(".")):
            raise StillroomError(
                f"override {shorten(repr(item))}: the key has an empty part; write it like "
                "distill.alpha=0.5"
            )
        _set_dotted(tree, key.strip(), value)
    return tree


def _node_at(loc: tuple[Any, ...], schema: type[Any]) -> tuple[type[Any], tuple[Any, ...], str]:
    """The section class at `loc`, the loc as the user wrote it, and the term kind when it passes
    through a list of term sections (pydantic adds the `kind` tag to an error's loc)."""
    node, shown, kind = schema, [], ""
    parts = iter(loc)
    for part in parts:
        shown.append(part)
        if isinstance(part, int):  # an item of a list of sections (generations, terms)
            continue
        field = node.__pydantic_fields__.get(str(part))
        annotation = field.annotation if field is not None else None
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if get_origin(annotation) is Annotated:  # a discriminated union: the next parts are the
            members = {_kind_of(m): m for m in get_args(get_args(annotation)[0])}  # index, tag
            index, kind = next(parts, None), str(next(parts, ""))
            shown.append(index)
            if kind not in members:
                break
            node = members[kind]
            continue
        if not (isinstance(annotation, type) and hasattr(annotation, "__pydantic_fields__")):
            break
        node = annotation
    return node, tuple(p for p in shown if p is not None), kind


def _kind_of(spec_class: type[Any]) -> str:
    return get_args(spec_class.__pydantic_fields__["kind"].annotation)[0]


def _explain(error: ValidationError, source: str, schema: type[BaseModel] = Recipe) -> str:
    """The first validation error as one line: where, what was given, what is allowed."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        node, shown, kind = _node_at(loc[:-1], schema)
        allowed = list(node.__pydantic_fields__)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        if not close and not kind:  # the key may belong one section deeper (teacher.train.epochs)
            deeper = _dotted_keys(node, tuple(str(p) for p in shown))
            wanted = ".".join(str(p) for p in (*shown, loc[-1]))
            near = [k for k in deeper if k.rsplit(".", 1)[-1] == str(loc[-1])]
            near = near or difflib.get_close_matches(wanted, deeper, n=1, cutoff=0.75)
            hint = f"; did you mean '{near[0]}'?" if near else "."
        if kind:  # a term section: name the kind, and the kinds the field belongs to
            where = ".".join(str(p) for p in shown)
            problem = spec_problem(kind, {**first, "loc": loc[-1:]})
            return f"{source}: {where}: {problem}{hint} Allowed here: {', '.join(allowed)}{more}"
        path = shorten(".".join(str(p) for p in loc))
        return f"{source}: unknown key '{path}'{hint} Allowed here: {', '.join(allowed)}{more}"
    _, shown, _ = _node_at(loc, schema)
    path = ".".join(str(p) for p in shown) or "(top level)"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        kinds = list(SPECS)
        given = first["input"].get("kind") if isinstance(first["input"], dict) else None
        close = difflib.get_close_matches(str(given), kinds, n=1) if given is not None else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        what = f"unknown term kind {given!r}" if given is not None else "a term needs a kind"
        return f"{source}: {path}.kind: {what}{hint or '.'} Allowed: {', '.join(kinds)}{more}"
    given = shorten(repr(first.get("input")))
    return f"{source}: {shorten(path)}: {shorten(first['msg'], 300)} (given {given}){more}"


def _dotted_keys(node: type[Any], prefix: tuple[str, ...], depth: int = 3) -> list[str]:
    """Every dotted key below the section class `node`, a few sections deep: the candidates a
    misplaced key is matched against."""
    keys = []
    for name, field in node.__pydantic_fields__.items():
        keys.append(".".join((*prefix, name)))
        annotation = field.annotation
        if (
            depth > 0
            and isinstance(annotation, type)
            and hasattr(annotation, "__pydantic_fields__")
        ):
            keys.extend(_dotted_keys(annotation, (*prefix, name), depth - 1))
    return keys


def read_recipe_tree(
    path: Path | str | None,
    overrides: list[str] | None = None,
    *,
    trust_remote_code: bool = False,
) -> tuple[dict[str, Any], str]:
    """The raw recipe mapping (YAML file, or {} for the defaults) with overrides applied, and a
    name for it in error messages.

    trust_remote_code: the caller's own grant (the CLI's --trust-remote-code, or the Python
        argument) to run Python files shipped in a model folder. A recipe cannot grant it: a
        `trust_remote_code: true` in the file or an override is refused unless this is True."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path, source = Path(path), shorten(str(path), 200)
        if not path.exists():
            raise StillroomError(f"recipe {source} does not exist; see recipes/ for examples")
        if not path.is_file():
            raise StillroomError(f"recipe {source} is not a file; give a .yaml recipe")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise StillroomError(
                f"recipe {source} is {path.stat().st_size:,} bytes; a recipe is a small YAML "
                f"file (at most {MAX_RECIPE_BYTES:,} bytes)"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise StillroomError(
                f"recipe {source} is not UTF-8 text (byte {err.start}); give a YAML file"
            ) from None
        try:
            loaded = safe_yaml(text, source)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "cannot be parsed"
            raise StillroomError(f"{source}: invalid YAML{where}: {shorten(problem)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise StillroomError(
                f"{source}: a recipe must be a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    tree = apply_overrides(tree, overrides or [])
    _no_granted_code(tree, source, trust_remote_code)
    return tree, source


def _no_granted_code(tree: Any, source: str, granted: bool, where: str = "") -> None:
    """Refuse `trust_remote_code: true` anywhere in a recipe unless the caller granted it; with
    the grant, every teacher section that has the field gets it (see read_recipe_tree)."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        here = f"{where}{key}"
        if key == "trust_remote_code" and value not in (False, None) and not granted:
            raise StillroomError(
                f"{source}: {here}: a recipe cannot allow a model folder's Python code to run; "
                "remove it and pass --trust-remote-code on the command line (Python: "
                "trust_remote_code=True) if you trust the folder"
            )
        _no_granted_code(value, source, granted, f"{here}.")


def grant_remote_code(tree: dict[str, Any], schema: type[BaseModel], source: str) -> None:
    """The caller's --trust-remote-code applied to a recipe mapping: its teacher section gets
    `trust_remote_code: true`, or one line when this method loads no folder that could run code."""
    teacher = schema.model_fields.get("teacher")
    annotation = teacher.annotation if teacher is not None else None
    fields = getattr(annotation, "model_fields", {})
    if "trust_remote_code" not in fields:
        raise StillroomError(
            f"{source}: --trust-remote-code is for recipes that load a transformers model folder "
            f"(method causal_lm); method {tree.get('method', 'classic')!r} never runs a model "
            "folder's code: drop the flag"
        )
    section = tree.setdefault("teacher", {})
    if isinstance(section, dict):
        section["trust_remote_code"] = True


def validate_recipe(tree: dict[str, Any], source: str, schema: type[SchemaT]) -> SchemaT:
    """Validate a recipe mapping against `schema`; the first problem as one line."""
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise StillroomError(_explain(err, source, schema)) from None


def load_recipe(path: Path | str | None, overrides: list[str] | None = None) -> Recipe:
    """Read a classic YAML recipe (None: the built-in defaults), apply overrides, validate.
    Recipes of any method: `stillroom.methods.load_method_recipe`."""
    tree, source = read_recipe_tree(path, overrides)
    return validate_recipe(tree, source, Recipe)


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML: every field, defaults included, ready to run again."""
    tree = recipe.model_dump(mode="json")
    for key, unset in (("tune", None), ("search", None), ("threads", "auto")):
        if key in tree and tree[key] == unset:  # unset, they stay out: earlier folders resume
            del tree[key]
    if "method" in tree:  # first, as a reader looks for it
        tree = {"method": tree.pop("method"), **tree}
    return yaml.safe_dump(tree, sort_keys=False)


def model_sections(tree: BaseModel) -> list[ModelSection]:
    """Every teacher/student section of a validated recipe, nested ones (members, generations)
    included."""
    found: list[ModelSection] = []
    for name in type(tree).model_fields:
        value = getattr(tree, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ModelSection):
                found.append(item)
            if isinstance(item, BaseModel):
                found.extend(model_sections(item))
    return found


def resolve_factories(recipe: BaseModel, recipe_path: Path | str | None) -> None:
    """The edge where a user's own model is named: each `kind: factory` section gets the recipe's
    folder in its search paths and is resolved now (a missing module or function fails here, in
    one line, before any data is read). Never called for a recipe read back from a run folder."""
    from stillroom.models import allow_factory
    from stillroom.models.factory import resolve_factory

    folders = [Path(recipe_path).resolve().parent] if recipe_path is not None else []
    for section in model_sections(recipe):
        if section.kind != "factory":
            continue
        assert section.factory is not None
        extra = [p for p in folders if p not in [q.resolve() for q in section.search_paths]]
        section.search_paths = [*section.search_paths, *extra]
        resolve_factory(section.factory, [*section.search_paths, Path.cwd()])
        allow_factory(section.factory)
