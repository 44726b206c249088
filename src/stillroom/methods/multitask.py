"""`method: multitask`: a teacher with one head per task teaches a student with the same heads.

Per task t, with its own loss kind, temperature T_t, blend alpha_t and weight w_t:

    loss = sum_t w_t * (alpha_t * KD_t(student_t, teacher_t) + (1 - alpha_t) * hard_label_t)

KD_t is the soft-target KL * T**2 (Hinton et al. 2015, arXiv:1503.02531) or DKD (Zhao et al.
2022, arXiv:2203.08679) for classification heads, MSE to the teacher's values for regression heads
(Li & Bilen 2020, "Knowledge distillation for multi-task learning", distil several single-task
teachers into one multi-task student; here one multi-head teacher plays their part). A sample missing a label
for task t adds nothing to hard_label_t but still gets the teacher's soft target for t, which is
where distillation helps most: tasks with few labels.

    data -> teacher (trained on every label of every task, or loaded) -> its outputs per task over
         the training set -> student from labels alone (masked; the baseline) and distilled student
         -> test metrics per task, gap closed per task

Run folder (`stillroom distill recipes/digits_multitask.yaml`):
    config.yaml                 the resolved recipe
    teacher/                    model.json + model.safetensors, metrics.jsonl, checkpoints/, ...
    soft_targets.safetensors    the teacher's outputs for every training sample, one tensor per task
    student_scratch/            the student trained on the labels it has, each task masked
    student_kd/                 the distilled student
    results.json, results.md    per task: test metric for each model, agreement, gap closed

Every model logs val/<task>/<metric> per epoch and the distilled student train/<task>/<term>.
Python API: `stillroom.methods.multitask_distill.distill_multitask(teacher, student, train_loader,
val_loader, tasks)`; the model: `stillroom.models.multitask.MultiTaskNet`; the data:
`stillroom.data.multitask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from stillroom.config import DistillSection, RecipeBase, TermSection, TrainSection
from stillroom.data.multitask import (
    MultiTaskData,
    MultiTaskSourceName,
    hide_task_labels,
    labelled_any,
    load_multitask,
    make_multitask_loader,
    split_multitask,
)
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.measure import model_costs
from stillroom.methods.multitask_distill import (
    TASK_LOSSES,
    TaskSpec,
    distill_multitask,
    multitask_soft_targets,
)
from stillroom.models import build_model, load_model, save_model
from stillroom.models.multitask import MultiTaskNet, multitask_spec, spec_heads, total_outputs
from stillroom.objective import (
    OUTPUT_KINDS,
    TermSpec,
    check_layer_names,
    tapped_layers,
    with_temperature,
)
from stillroom.results import ModelResult, Summary, write_summary
from stillroom.runs import gap_closed, is_complete, mark_complete, prepare_run_dir
from stillroom.train import TrainArgs, evaluate, predict
from stillroom.train.evaluate import METRICS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSection(_Section):
    """One task of the recipe: which target of the data, and how it is distilled."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="a task of the data")
    kind: Literal["classification", "regression"]
    weight: float = Field(
        1.0,
        gt=0,
        description="w_t: the task's weight in the summed loss of every model the recipe trains "
        "(teacher, scratch and distilled student)",
    )
    loss: Literal["soft_target", "dkd", "regression"] | None = Field(
        None, description="soft_target or dkd (classification), regression; default by kind"
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="distillation share within the task; default distill.alpha"
    )
    temperature: float | None = Field(
        None, gt=0, description="classification only; default distill.temperature"
    )
    label_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of training samples whose label for this task the "
        "students see; the teacher gives soft targets for every sample",
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> TaskSection:
        loss = self.loss or TASK_LOSSES[self.kind][0]
        if loss not in TASK_LOSSES[self.kind]:
            raise ValueError(
                f"loss {loss!r} does not fit a {self.kind} task; use {' or '.join(TASK_LOSSES[self.kind])}"
            )
        if self.kind == "regression" and self.temperature is not None:
            raise ValueError("temperature softens class probabilities; a regression task has none")
        return self


class MultiTaskDataSection(_Section):
    source: MultiTaskSourceName = Field(
        "digits", description="digits: digit (10 classes) + slant (regression); npz: your arrays"
    )
    path: Path | None = Field(None, description="npz: inputs + one target_<task> array per task")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)


class MultiTaskModelSection(_Section):
    trunk: Literal["mlp", "cnn"] = Field("mlp", description="the shared trunk's architecture")
    hidden: list[int] = Field(
        [64], min_length=1, description="trunk widths; the last feeds the heads"
    )
    channels: list[int] = Field([32, 64], description="conv channels per block (cnn trunk)")
    head_hidden: list[int] = Field([], description="each head's own hidden widths; [] = linear")
    dropout: float = Field(0.0, ge=0, lt=1)
    heads: list[str] | None = Field(
        None, description="the task heads to build; default: one per task of the recipe"
    )

    def spec(self, heads: dict[str, tuple[str, int]]) -> dict[str, Any]:
        return multitask_spec(
            heads, self.trunk, self.hidden, self.channels, self.dropout, self.head_hidden
        )


class MultiTaskTeacherSection(MultiTaskModelSection):
    trunk: Literal["mlp", "cnn"] = "cnn"
    hidden: list[int] = Field([128], min_length=1)
    checkpoint: Path | None = Field(
        None, description="a multitask teacher saved by stillroom (model.json + model.safetensors)"
    )
    train: TrainSection = TrainSection(epochs=20)


def _shared(name: str) -> Any:
    """The classic distill section's default: one value for every method."""
    return DistillSection.model_fields[name].default


class MultiTaskDistillSection(TrainSection):
    epochs: int = Field(_shared("epochs"), ge=1)
    lr: float = Field(_shared("lr"), gt=0)
    alpha: float = Field(_shared("alpha"), ge=0, le=1, description="default alpha of every task")
    temperature: float = Field(
        _shared("temperature"), gt=0, description="default temperature of classification tasks"
    )
    dkd_alpha: float = Field(
        _shared("dkd_alpha"), ge=0, description="loss dkd: weight of the target-class term"
    )
    dkd_beta: float = Field(
        _shared("dkd_beta"), ge=0, description="loss dkd: weight of the non-target-class term"
    )
    select: str | None = Field(
        None,
        description="the task whose validation metric picks the best checkpoint (default: first)",
    )
    terms: list[TermSection] = Field(
        [], description="extra terms for the distilled student (hint on the trunk, ...)"
    )


class MultiTaskRecipe(RecipeBase):
    """A multi-head teacher distilled into a multi-head student, task by task (method: multitask)."""

    method: Literal["multitask"] = "multitask"
    name: str = "digits_multitask"
    data: MultiTaskDataSection = MultiTaskDataSection()
    teacher: MultiTaskTeacherSection = MultiTaskTeacherSection()
    student: MultiTaskModelSection = MultiTaskModelSection()
    distill: MultiTaskDistillSection = MultiTaskDistillSection()
    baseline: bool = Field(
        True, description="also train the student on labels alone, for comparison"
    )
    tasks: list[TaskSection] = Field(
        [
            TaskSection(name="digit", kind="classification"),
            TaskSection(name="slant", kind="regression", label_fraction=0.05),
        ],
        min_length=1,
        description="the tasks, each a head on teacher and student",
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskSection]) -> list[TaskSection]:
        names = [t.name for t in tasks]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise ValueError(f"task {twice!r} is listed twice; give each task one entry")
        return tasks

    @model_validator(mode="after")
    def _select_is_a_task(self) -> MultiTaskRecipe:
        names = [t.name for t in self.tasks]
        if self.distill.select is not None and self.distill.select not in names:
            raise ValueError(
                f"distill.select {self.distill.select!r} is not a task; tasks: {', '.join(names)}"
            )
        return self

    def task_specs(self) -> list[TaskSpec]:
        d = self.distill
        return [
            TaskSpec(
                t.name,
                t.kind,
                t.weight,
                d.alpha if t.alpha is None else t.alpha,
                t.temperature or d.temperature,
                t.loss,
                d.dkd_alpha,
                d.dkd_beta,
            )
            for t in self.tasks
        ]

    def extra_terms(self) -> tuple[TermSpec, ...]:
        d = self.distill
        return tuple(with_temperature(term, d.temperature) for term in d.terms)

    def args(
        self, section: TrainSection, progress: bool, description: str, **extra: Any
    ) -> TrainArgs:
        fields = section.model_dump(include=set(TrainSection.model_fields))
        return TrainArgs(
            **fields,
            seed=self.seed,
            cpu=self.cpu,
            progress=progress,
            description=description,
            **extra,
        )


@dataclass
class MultiTaskResult:
    run_dir: Path
    tasks: dict[str, str]
    """task -> kind."""
    metrics: dict[str, str]
    """task -> the metric its columns show (accuracy, rmse)."""
    rows: dict[str, dict[str, Any]]
    """role -> "<task>/<metric>" test values, parameters, size_bytes, latency_ms, agreement."""
    gap_closed: dict[str, float | None]
    """task -> (kd - scratch) / (teacher - scratch) of its metric."""


def _check_data(recipe: MultiTaskRecipe, data: MultiTaskData) -> dict[str, tuple[str, int]]:
    """Each recipe task exists in the data with the recipe's kind; returns task -> (kind, outputs)."""
    have = ", ".join(f"{n} ({i.kind})" for n, i in data.tasks.items())
    for i, task in enumerate(recipe.tasks):
        info = data.tasks.get(task.name)
        if info is None:
            raise StillroomError(
                f"tasks[{i}]: data '{data.name}' has no task {task.name!r}; its tasks: {have}"
            )
        if info.kind != task.kind:
            raise StillroomError(
                f"tasks[{i}] {task.name!r} is declared {task.kind}, but in data '{data.name}' it is "
                f"{info.kind}; set kind: {info.kind} (with loss {' or '.join(TASK_LOSSES[info.kind])})"
            )
        if info.kind == "classification" and info.num_outputs < 2:
            raise StillroomError(
                f"task {task.name!r} has {info.num_outputs} class(es) in the data; need >= 2"
            )
    return {t.name: (t.kind, data.tasks[t.name].num_outputs) for t in recipe.tasks}


def _heads(
    section: MultiTaskModelSection, whose: str, heads: dict[str, tuple[str, int]]
) -> dict[str, tuple[str, int]]:
    """The heads a section builds: its `heads` list (checked against the tasks), or every task."""
    if section.heads is None:
        return heads
    unknown = [h for h in section.heads if h not in heads]
    if unknown:
        raise StillroomError(
            f"{whose}.heads names {unknown[0]!r}, which is not a task of the recipe; tasks: {', '.join(heads)}"
        )
    missing = [t for t in heads if t not in section.heads]
    if missing:
        raise StillroomError(
            f"the {whose} has no head for task {missing[0]!r}; its heads: "
            f"{', '.join(section.heads) or 'none'}. Add {missing[0]!r} to {whose}.heads, or drop the task"
        )
    return {h: heads[h] for h in section.heads}


def _load_teacher(
    checkpoint: Path, heads: dict[str, tuple[str, int]], input_shape: tuple[int, ...]
) -> tuple[nn.Module, dict[str, Any]]:
    module, meta = load_model(checkpoint)
    if not isinstance(module, MultiTaskNet):
        raise StillroomError(
            f"teacher {checkpoint} is a single-output '{meta['spec'].get('kind')}' model; a multitask "
            f"recipe needs a multitask teacher with heads for {', '.join(heads)}"
        )
    if tuple(meta["input_shape"]) != input_shape:
        raise StillroomError(
            f"teacher {checkpoint} takes inputs {tuple(meta['input_shape'])} but the data has {input_shape}"
        )
    for task, (kind, size) in heads.items():
        if task not in module.head_specs:
            raise StillroomError(
                f"teacher {checkpoint} has no head for task {task!r}; its heads: "
                f"{', '.join(module.head_specs)}. Use a teacher trained on every task, or drop the task"
            )
        if module.head_specs[task] != (kind, size):
            got_kind, got_size = module.head_specs[task]
            raise StillroomError(
                f"teacher {checkpoint}: head {task!r} is {got_kind} with {got_size} outputs, but the "
                f"task is {kind} with {size}"
            )
    return module, meta


def _built(spec: dict[str, Any], input_shape: tuple[int, ...], seed: int) -> MultiTaskNet:
    """Built with a fixed seed: initial weights must not depend on what ran before in the process."""
    torch.manual_seed(seed)
    return build_model(spec, input_shape, total_outputs(spec_heads(spec)))


def _check_terms(recipe: MultiTaskRecipe, student: nn.Module, teacher: nn.Module | None) -> None:
    """Extra terms: output terms must name a task; tapped layer names must exist (checked now,
    not after the teacher has trained)."""
    names = [t.name for t in recipe.tasks]
    for i, term in enumerate(recipe.extra_terms()):
        reads_outputs = term.kind in (*OUTPUT_KINDS, "hard_label") or (
            term.kind == "adversarial" and term.student is None
        )
        if reads_outputs and term.output not in names:
            raise StillroomError(
                f"distill.terms[{i}] ({term.kind}) reads the outputs of a multi-task student: name the "
                f"task with output: one of {', '.join(names)}"
            )
    student_layers, teacher_layers = tapped_layers(list(recipe.extra_terms()))
    if student_layers:
        check_layer_names(student, student_layers)
    if teacher_layers and teacher is not None:
        check_layer_names(teacher, teacher_layers)


def run_multitask(
    recipe: MultiTaskRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> MultiTaskResult:
    """Run every phase of `recipe` into `run_dir` (resuming started phases with `resume`; `force`
    replaces an earlier run there once every check has passed)."""
    run_dir = Path(run_dir)
    # everything that can be checked before any training is checked before the run folder exists
    data = load_multitask(recipe.data.source, recipe.data.path)
    heads = _check_data(recipe, data)
    tasks, names = recipe.task_specs(), [t.name for t in recipe.tasks]
    splits = split_multitask(data, recipe.data.test_fraction, recipe.data.val_fraction, recipe.seed)
    fractions = {t.name: t.label_fraction for t in recipe.tasks}
    student_train = hide_task_labels(splits.train, fractions, recipe.seed)
    input_shape = data.input_shape
    student_spec = recipe.student.spec(_heads(recipe.student, "student", heads))
    student = _built(student_spec, input_shape, recipe.seed)
    if recipe.teacher.checkpoint is not None:
        teacher, meta = _load_teacher(recipe.teacher.checkpoint, heads, input_shape)
        teacher_spec = meta["spec"]
    else:
        teacher_spec = recipe.teacher.spec(_heads(recipe.teacher, "teacher", heads))
        teacher = _built(teacher_spec, input_shape, recipe.seed)
    _check_terms(recipe, student, teacher)
    prepare_run_dir(run_dir, recipe, resume, force, (recipe.teacher.checkpoint, recipe.data.path))
    batch, select = recipe.data.batch_size, recipe.distill.select

    def phase(
        name: str,
        source: Any,
        model: nn.Module,
        spec: dict[str, Any],
        train: MultiTaskData,
        args: TrainArgs,
    ) -> nn.Module:
        if resume and is_complete(run_dir / name):
            # a finished phase: load it, do not touch it
            return load_model(run_dir / name)[0]
        result = distill_multitask(
            source,
            model,
            make_multitask_loader(train, batch, shuffle=True, tasks=names),
            make_multitask_loader(splits.val, 512, shuffle=False, tasks=names),
            tasks,
            select=select,
            run_dir=run_dir / name,
            resume=resume,
            args=args,
        )
        save_model(
            result.student,
            spec,
            run_dir / name,
            input_shape=list(input_shape),
            num_outputs=total_outputs(spec_heads(spec)),
        )
        mark_complete(run_dir / name)
        return result.student

    # 1. the teacher: loaded, or trained on every label of every task (it stands for the big model
    #    that already exists; the label fractions limit what the *students* see)
    if recipe.teacher.checkpoint is not None:
        save_model(
            teacher,
            teacher_spec,
            run_dir / "teacher",
            input_shape=list(input_shape),
            num_outputs=total_outputs(teacher.head_specs),
        )
    else:
        teacher_args = recipe.args(recipe.teacher.train, progress, "teacher")
        teacher = phase("teacher", None, teacher, teacher_spec, splits.train, teacher_args)

    # 2. the teacher's outputs for every task over every training input, labelled or not
    soft_targets = multitask_soft_targets(
        teacher, make_multitask_loader(student_train, 512, shuffle=False), names
    )
    soft_targets.save(run_dir / "soft_targets.safetensors")

    # 3. the same student, from the labels it has (each task masked) and distilled
    students: dict[str, nn.Module] = {}
    if recipe.baseline:
        scratch = _built(student_spec, input_shape, recipe.seed)
        scratch_args = recipe.args(recipe.distill, progress, "scratch")
        # without a teacher only samples with some label carry any signal
        students["student_scratch"] = phase(
            "student_scratch",
            None,
            scratch,
            student_spec,
            labelled_any(student_train, names),
            scratch_args,
        )
    extra = recipe.extra_terms()
    # feature terms read the teacher's intermediate layers at every step: they need it live
    kd_teacher: Any = teacher if tapped_layers(list(extra))[1] else soft_targets
    kd_args = recipe.args(recipe.distill, progress, "distill", terms=extra)
    students["student_kd"] = phase(
        "student_kd", kd_teacher, student, student_spec, student_train, kd_args
    )

    # 4. the comparison on the held-out test split, task by task
    rows = _evaluate(recipe, {"teacher": teacher, **students}, splits.test, run_dir)
    metrics = {t.name: METRICS[t.kind][0] for t in recipe.tasks}
    gaps = {task: gap_closed(rows, f"{task}/{metric}") for task, metric in metrics.items()}
    result = MultiTaskResult(run_dir, {t.name: t.kind for t in recipe.tasks}, metrics, rows, gaps)
    _write_results(recipe, result, student_train, len(splits.test))
    return result


def _evaluate(
    recipe: MultiTaskRecipe, models: dict[str, nn.Module], test: MultiTaskData, run_dir: Path
) -> dict[str, dict[str, Any]]:
    kinds = {t.name: t.kind for t in recipe.tasks}
    loader = make_multitask_loader(test, 512, shuffle=False, tasks=list(kinds))
    teacher_outputs = predict(models["teacher"], loader)[0]
    rows: dict[str, dict[str, Any]] = {}
    for role, model in models.items():
        row: dict[str, Any] = {**evaluate(model, loader, kinds)}
        row.update(model_costs(model, run_dir / role / "model.safetensors", test.input_shape))
        if role != "teacher":
            outputs = predict(model, loader)[0]
            for task, kind in kinds.items():
                if kind == "classification":
                    agree = outputs[task].argmax(1) == teacher_outputs[task].argmax(1)
                    row[f"{task}/teacher_agreement"] = agree.float().mean().item()
        rows[role] = row
    return rows


def _write_results(
    recipe: MultiTaskRecipe,
    result: MultiTaskResult,
    student_train: MultiTaskData,
    test_samples: int,
) -> None:
    labels = student_train.label_counts()
    specs = {t.name: t for t in recipe.task_specs()}
    payload = {
        "method": "multitask",
        "tasks": {
            task: {
                "kind": kind,
                "metric": result.metrics[task],
                "loss": specs[task].kd_loss,
                "weight": specs[task].weight,
                "alpha": specs[task].alpha,
                "temperature": specs[task].temperature if kind == "classification" else None,
                "labelled_train_samples": labels[task],
                "gap_closed": result.gap_closed[task],
            }
            for task, kind in result.tasks.items()
        },
        "train_samples": len(student_train),
        "test_samples": test_samples,
        "models": result.rows,
    }
    atomic_write_json(result.run_dir / "results.json", payload)
    write_summary(summarize(result), result.run_dir)


STANDARDISED = (
    "regression targets are standardised with the training split's mean and std: an rmse of 1.0 "
    "is what predicting the mean scores"
)


def summarize(result: MultiTaskResult) -> Summary:
    """One row per model, one metric column per task (and the teacher agreement per class task)."""
    columns = [f"{task}/{metric}" for task, metric in result.metrics.items()]
    roles = {"teacher": "teacher", "student_scratch": "baseline", "student_kd": "distilled"}
    models = [
        ModelResult(
            name=name,
            role=roles[name],  # type: ignore[arg-type]
            metrics={key: row.get(key) for key in columns}
            | {k: v for k, v in row.items() if k.endswith("/teacher_agreement")},
            folder=name,
            parameters=row["parameters"],
            size_bytes=row["size_bytes"],
            latency_ms=row["latency_ms"],
            teacher="teacher" if name == "student_kd" else "",
        )
        for name, row in result.rows.items()
    ]
    first_task = next(iter(result.metrics))
    notes = _gap_lines(result)
    if "regression" in result.tasks.values():
        notes.append(STANDARDISED)
    return Summary(
        method="multitask",
        title=f"multi-task distillation: test metric per task ({result.run_dir.name})",
        task="multitask",
        metric=columns[0],
        higher_is_better=METRICS[result.tasks[first_task]][1] == "max",
        models=models,
        settings={"tasks": dict(result.tasks)},
        notes=notes,
        primary="student_kd",
    )


def _gap_lines(result: MultiTaskResult) -> list[str]:
    lines = []
    for task, gap in result.gap_closed.items():
        value = "n/a" if gap is None else f"{gap:.2f}"
        lines.append(
            f"gap closed on {task} ({result.metrics[task]}) = (kd - scratch) / (teacher - scratch) = {value}"
        )
    return lines
