"""Dense prediction: a segmentation or CenterNet-style detection teacher distilled into a small
fully-convolutional student (method: dense).

    scenes of digits (built in, masks and boxes known) or the user's .npz
        -> teacher (trained on the labels, or loaded from a stillroom model folder)
        -> the student from labels alone (student_scratch) and one distilled student per variant
           (student_<variant>: `loss = hard_weight * hard_label + sum_i weight_i * term_i`,
           any mix of soft_target (per pixel), cwd, heatmap, box, hint, ... terms)
        -> test: mIoU and pixel accuracy (segmentation), mAP@0.5 and mAP@[.5:.95] by pycocotools
           (detection); gap closed of every distilled student; size and latency

A method of its own rather than two more tasks in `classic`: classic's data section, soft-target
cache and checks are built for (N,) labels; dense targets ((N, H, W) masks, (N, M, 5) boxes),
the per-term variants the benchmark compares and the resolution checks would branch it in many
places. The loop, the terms, the model layer and the run folder are the shared ones.

Run folder:
    config.yaml, data.json        the recipe; how the data was read (source, classes, sizes)
    teacher/, student_scratch/, student_<variant>/   model.json + model.safetensors + done.json
    results.json                  every model's test metrics and each variant's gap closed
    summary.json, results.md      the result contract (stillroom.results)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stillroom.config import RecipeBase
from stillroom.data import ArrayData, make_loader
from stillroom.dense.scenes import TASKS, make_scenes, read_dense_npz, scene_classes
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.measure import model_costs
from stillroom.models import allow_factory, build_model, load_model
from stillroom.objective import (
    AnyTermSpec,
    HardLabelSpec,
    SoftTargetSpec,
    TermSpec,
    build_objective,
)
from stillroom.pipeline import build_seeded, train_phase
from stillroom.results import ModelResult, Summary, gap_note, write_summary
from stillroom.runs import is_complete, prepare_run_dir
from stillroom.train import TrainArgs, evaluate
from stillroom.train.evaluate import METRICS

PIXEL_KINDS = ("soft_target", "regression", "dkd", "adversarial")
"""Output terms that compare teacher and student pixel by pixel: same resolution needed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DenseDataSection(_Section):
    source: Literal["scenes", "npz"] = Field(
        "scenes", description="scenes: digits placed on a canvas (built in); npz: your arrays"
    )
    task: Literal[TASKS] = "segmentation"  # type: ignore[valid-type]
    path: Path | None = Field(
        None, description="npz: inputs (N, C, H, W) with masks (N, H, W) or boxes (N, M, 5)"
    )
    val_path: Path | None = None
    test_path: Path | None = None
    num_classes: int | None = Field(
        None, ge=1, description="npz: classes of the head (default: the largest class + 1)"
    )
    ignore_index: int = Field(255, description="npz masks: the value of unlabelled pixels")
    train_scenes: int = Field(1200, ge=1, description="scenes: training scenes")
    val_scenes: int = Field(300, ge=1)
    test_scenes: int = Field(300, ge=1)
    canvas: int = Field(32, ge=8, le=512, description="scenes: canvas side in pixels")
    scale: int = Field(2, ge=1, le=8, description="scenes: each 8x8 digit upscaled by this")
    max_digits: int = Field(3, ge=1, le=16, description="scenes: digits per scene, 1..this")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="npz without val_path")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="npz without test_path")
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _paths_fit_the_source(self) -> DenseDataSection:
        if self.source == "npz" and self.path is None:
            raise ValueError("data.source npz needs data.path: your .npz file")
        if self.source == "scenes" and (self.path or self.val_path or self.test_path):
            raise ValueError("data.source scenes is built in and reads no path; use source npz")
        return self


class DenseModelSection(_Section):
    kind: Literal["fcn", "factory"] = "fcn"
    channels: list[int] = Field([16, 32, 64], min_length=1, description="fcn stage widths")
    output_stride: int = Field(1, ge=1, description="fcn: input pixels per output cell")
    factory: str | None = Field(
        None, description="kind factory: module:function(input_shape, num_outputs, **kwargs)"
    )
    kwargs: dict[str, Any] = {}
    checkpoint: Path | None = Field(
        None, description="teacher: a stillroom model folder to load instead of training one"
    )
    epochs: int = Field(15, ge=1)
    lr: float = Field(3e-3, gt=0)

    @model_validator(mode="after")
    def _factory_named(self) -> DenseModelSection:
        if (self.kind == "factory") != (self.factory is not None):
            raise ValueError("kind factory and factory: module:function go together")
        return self

    def spec(self) -> dict[str, Any]:
        if self.kind == "factory":
            return {"kind": "factory", "factory": self.factory, "kwargs": self.kwargs,
                    "search_paths": []}  # fmt: skip
        return {"kind": "fcn", "channels": self.channels, "output_stride": self.output_stride}

    def label(self) -> str:
        if self.kind == "factory":
            return f"factory {self.factory}"
        return f"fcn {'-'.join(map(str, self.channels))} /{self.output_stride}"


class DenseDistillSection(_Section):
    epochs: int = Field(15, ge=1)
    lr: float = Field(3e-3, gt=0)
    temperature: float = Field(4.0, gt=0, description="for terms that set none (soft_target, cwd)")
    hard_weight: float = Field(1.0, ge=0, description="weight of the labels' term in every student")
    variants: dict[str, list[AnyTermSpec]] = Field(  # type: ignore[valid-type]
        {"soft_target": [SoftTargetSpec(weight=1.0)]},
        min_length=1,
        description="one distilled student per entry: name -> its terms (beside the labels')",
    )

    @model_validator(mode="after")
    def _names(self) -> DenseDistillSection:
        for name, terms in self.variants.items():
            if not name.isidentifier() or name == "scratch":
                raise ValueError(f"variant name {name!r}: use a word other than 'scratch'")
            if not terms:
                raise ValueError(f"variant {name!r} has no terms")
        return self


class DenseRecipe(RecipeBase):
    """A dense teacher (segmentation, detection) -> a small dense student (method: dense)."""

    method: Literal["dense"] = "dense"
    name: str = "dense"
    data: DenseDataSection = DenseDataSection()
    teacher: DenseModelSection = DenseModelSection(channels=[32, 64, 128], epochs=20)
    student: DenseModelSection = DenseModelSection(channels=[8, 16, 32])
    distill: DenseDistillSection = DenseDistillSection()
    baseline: bool = True

    @model_validator(mode="after")
    def _student_is_trained(self) -> DenseRecipe:
        if self.student.checkpoint is not None:
            raise ValueError("student.checkpoint: students are trained here; drop it")
        return self


def read_dense(recipe: DenseRecipe) -> tuple[ArrayData, ArrayData, ArrayData, dict[str, Any]]:
    """(train, val, test, record) of the recipe's data, checked."""
    section, seed = recipe.data, recipe.seed
    task = section.task
    if section.source == "scenes":
        shape = {"canvas": section.canvas, "scale": section.scale,
                 "max_digits": section.max_digits}  # fmt: skip
        train = make_scenes(section.train_scenes, task, seed, **shape)
        # validation and test scenes: digits the training scenes never show, other seeds
        val = make_scenes(section.val_scenes, task, seed + 10_000, held_out=True, **shape)
        test = make_scenes(section.test_scenes, task, seed + 20_000, held_out=True, **shape)
        classes = scene_classes(task)
    else:
        assert section.path is not None
        read = {"task": task, "num_classes": section.num_classes,
                "ignore_index": section.ignore_index}  # fmt: skip
        data, classes = read_dense_npz(section.path, **read)
        read["num_classes"] = classes  # own splits are read against the training file's head
        val = read_dense_npz(section.val_path, **read)[0] if section.val_path else None
        test = read_dense_npz(section.test_path, **read)[0] if section.test_path else None
        for part, other in (("val", val), ("test", test)):
            if other is not None and other.input_shape != data.input_shape:
                raise StillroomError(
                    f"data.{part}_path has inputs {other.input_shape} but data.path "
                    f"{data.input_shape}; give splits of one dataset"
                )
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        n_test = 0 if test is not None else max(1, round(section.test_fraction * len(data)))
        n_val = 0 if val is not None else max(1, round(section.val_fraction * len(data)))
        if len(data) - n_test - n_val < 1:
            raise StillroomError(
                f"{section.path} has {len(data)} samples: too few to cut validation and test "
                "splits from; give more, or data.val_path and data.test_path"
            )
        test = test if test is not None else data.subset(order[:n_test])
        val = val if val is not None else data.subset(order[n_test : n_test + n_val])
        train = data.subset(order[n_test + n_val :])
    record = {
        "source": section.source,
        "task": task,
        "classes": classes,
        "input_shape": list(train.input_shape),
        "samples": {"train": len(train), "val": len(val), "test": len(test)},
    }
    return train, val, test, record


def _probe(name: str, model: torch.nn.Module, example: torch.Tensor, outputs: int) -> tuple:
    with torch.random.fork_rng(), torch.no_grad():
        try:
            out = model.eval()(example)
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise StillroomError(
                f"the {name} cannot take inputs of shape {tuple(example.shape[1:])}: {last}"
            ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != outputs:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StillroomError(
            f"the {name} gives {shape} per image but the data needs ({outputs}, H, W) maps; "
            f"give it {outputs} output channels"
        )
    return tuple(out.shape)


def check_pair(
    recipe: DenseRecipe, train: ArrayData, teacher: torch.nn.Module | None = None
) -> torch.nn.Module:
    """Build the student (and the teacher unless given), probe both on real images, and size every
    variant's terms: a wrong head, a layer name that does not exist, or outputs of two resolutions
    for a term that compares pixels are one line now, before any training."""
    example = train.inputs[:2]
    task, outputs = train.task, train.num_outputs
    with torch.random.fork_rng():
        student = build_model(recipe.student.spec(), train.input_shape, outputs)
        teacher = teacher or build_model(recipe.teacher.spec(), train.input_shape, outputs)
        s_out = _probe("student", student, example, outputs)
        t_out = _probe("teacher", teacher, example, outputs)
        for variant, terms in recipe.distill.variants.items():
            pixel = [t.kind for t in terms if t.kind in PIXEL_KINDS and t.student is None]
            if pixel and s_out[2:] != t_out[2:]:
                raise StillroomError(
                    f"variant {variant!r}: term {pixel[0]} compares outputs pixel by pixel, but "
                    f"the teacher gives {t_out[2]}x{t_out[3]} maps and the student "
                    f"{s_out[2]}x{s_out[3]}; give both the same output_stride, or use cwd / "
                    "heatmap / box, which align the student's maps to the teacher's"
                )
            try:
                build_objective(list(terms), task, student, teacher, example, None, 4.0)
            except StillroomError as err:
                raise StillroomError(f"variant {variant!r}: {err}") from None
    return teacher


def _teacher(
    recipe: DenseRecipe,
    run_dir: Path,
    train: ArrayData,
    val: ArrayData,
    given: torch.nn.Module | None,
    progress: bool,
    resume: bool,
) -> torch.nn.Module:
    spec = recipe.teacher.spec()
    if given is not None:
        from stillroom.models import save_model

        save_model(given, spec, run_dir / "teacher", input_shape=list(train.input_shape),
                   num_outputs=train.num_outputs)  # fmt: skip
        return given
    return _phase("teacher", recipe, run_dir, None, spec, recipe.teacher, (), train, val,
                  progress, resume)  # fmt: skip


def _phase(
    name: str,
    recipe: DenseRecipe,
    run_dir: Path,
    teacher: torch.nn.Module | None,
    spec: dict[str, Any],
    section: DenseModelSection | DenseDistillSection,
    terms: tuple[TermSpec, ...],
    train: ArrayData,
    val: ArrayData,
    progress: bool,
    resume: bool,
) -> torch.nn.Module:
    if resume and is_complete(run_dir / name):
        return load_model(run_dir / name)[0]
    hard = HardLabelSpec(weight=recipe.distill.hard_weight if terms else 1.0, name="hard_label")
    args = TrainArgs(
        epochs=section.epochs,
        lr=section.lr,
        alpha=None,  # the objective is exactly the labels' term plus the variant's terms
        terms=(hard, *terms),
        temperature=recipe.distill.temperature,
        task=train.task,
        seed=recipe.seed,
        cpu=recipe.cpu,
        progress=progress,
        description=name,
    )
    # identically initialised students: the variants differ by their terms alone
    model = build_seeded(spec, train.input_shape, train.num_outputs, recipe.seed)
    return train_phase(name, run_dir, teacher, model, spec, train, val, args,
                       recipe.data.batch_size, resume)  # fmt: skip


def run_dense(
    recipe: DenseRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Summary:
    """Every phase of `recipe` into `run_dir` (finished phases are loaded on --resume)."""
    run_dir = Path(run_dir)
    for section in (recipe.teacher, recipe.student):
        if section.factory is not None:
            allow_factory(section.factory)
    train, val, test, record = read_dense(recipe)
    given = None
    if recipe.teacher.checkpoint is not None:
        given, meta = load_model(recipe.teacher.checkpoint)
        if tuple(meta["input_shape"]) != train.input_shape or meta["num_outputs"] != (
            train.num_outputs
        ):
            raise StillroomError(
                f"teacher.checkpoint {recipe.teacher.checkpoint} takes {tuple(meta['input_shape'])}"
                f" with {meta['num_outputs']} outputs, but the data has {train.input_shape} and "
                f"{train.num_outputs}"
            )
    check_pair(recipe, train, given)
    protected = (recipe.data.path, recipe.data.val_path, recipe.data.test_path,
                 recipe.teacher.checkpoint)  # fmt: skip
    prepare_run_dir(run_dir, recipe, resume, force, protected)
    atomic_write_json(run_dir / "data.json", record)

    teacher = _teacher(recipe, run_dir, train, val, given, progress, resume)
    teacher.requires_grad_(False)
    plans: dict[str, tuple[TermSpec, ...]] = {"student_scratch": ()} if recipe.baseline else {}
    plans |= {f"student_{v}": tuple(terms) for v, terms in recipe.distill.variants.items()}
    spec = recipe.student.spec()
    students = {
        name: _phase(name, recipe, run_dir, teacher if terms else None, spec, recipe.distill,
                     terms, train, val, progress, resume)
        for name, terms in plans.items()
    }  # fmt: skip

    task = train.task
    metric = METRICS[task][0]
    test_loader = make_loader(test, 64, shuffle=False)
    val_loader = make_loader(val, 64, shuffle=False)
    rows: dict[str, dict[str, Any]] = {}
    val_metric: dict[str, float] = {}
    for name, model in {"teacher": teacher, **students}.items():
        costs = model_costs(model, run_dir / name / "model.safetensors", train.input_shape)
        rows[name] = {**evaluate(model, test_loader, task), **costs}
        if name.startswith("student_") and name != "student_scratch":
            val_metric[name] = evaluate(model, val_loader, task)[metric]
    gaps = {}
    for name in plans:
        if name != "student_scratch":
            gaps[name] = gap_note(rows["teacher"][metric], rows.get("student_scratch", {}).get(
                metric), rows[name][metric], metric, True)  # fmt: skip
    primary = max(val_metric, key=val_metric.__getitem__)
    atomic_write_json(
        run_dir / "results.json",
        {"task": task, "metric": metric, "data": record, "models": rows,
         "gap_closed": {name: gap for name, (gap, _) in gaps.items()}, "primary": primary},
    )  # fmt: skip
    summary = _summary(recipe, record, rows, gaps, primary)
    write_summary(summary, run_dir)
    return summary


def _summary(
    recipe: DenseRecipe,
    record: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    gaps: dict[str, tuple[float | None, str]],
    primary: str,
) -> Summary:
    task = record["task"]
    metric = METRICS[task][0]
    other = "pixel_accuracy" if task == "segmentation" else "map"
    models = [
        ModelResult(
            name=name,
            role="teacher" if name == "teacher" else
            "baseline" if name == "student_scratch" else "distilled",
            metrics={metric: row[metric], other: row[other],
                     "gap_closed": gaps[name][0] if name in gaps else None},
            folder=name,
            parameters=row["parameters"],
            size_bytes=row["size_bytes"],
            latency_ms=row["latency_ms"],
            architecture=(recipe.teacher if name == "teacher" else recipe.student).label(),
            teacher="teacher" if name in gaps else "",
        )
        for name, row in rows.items()
    ]  # fmt: skip
    variants = recipe.distill.variants
    data = recipe.data
    return Summary(
        method="dense",
        title=f"{recipe.name}: {task}, test set",
        task=task,
        metric=metric,
        higher_is_better=True,
        models=models,
        settings={
            "data": f"{data.source}" + (f" ({data.path})" if data.path else "")
            + f", {record['classes']} classes, {record['samples']}, seed {recipe.seed}",
            "distillation": f"epochs {recipe.distill.epochs}, lr {recipe.distill.lr}, T "
            f"{recipe.distill.temperature}, hard_weight {recipe.distill.hard_weight}; variants: "
            + "; ".join(f"{v}: " + ", ".join(f"{t.kind} x{t.weight:g}" for t in terms)
                        for v, terms in variants.items()),
            "teacher": recipe.teacher.label(),
            "student": recipe.student.label(),
        },
        notes=[f"{name}: {line}" for name, (_, line) in gaps.items()]
        + [f"primary: {primary} (best validation {metric} among the distilled students)"],
        primary=primary,
    )  # fmt: skip
