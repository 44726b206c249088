"""The classic workflow: `stillroom distill RECIPE` with `method: classic` (the default) and the demo.

    data -> teacher (trained, or loaded from a checkpoint) -> soft targets over the training set
         -> student from labels alone (baseline) and distilled student -> test metrics and costs

Run folder:
    config.yaml                 the resolved recipe (every field)
    data.json                   how the data was read: source, columns, encodings, split sizes,
                                the standardisation every model carries (see data/scaling.py)
    teacher/                    model.json + model.safetensors, metrics.jsonl, checkpoints/
    soft_targets.safetensors    the teacher's logits for every training sample (row = sample id);
                                absent when teacher.store gives them or the teacher runs live
    student_scratch/            the student trained on labels alone
    student_kd/                 the distilled student
    results.json                every number of the comparison
    summary.json, results.md    the result contract (see stillroom.results) and its table
    curves.png, size_vs_metric.png
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillroom.config import Recipe
from stillroom.data import ArrayData, labelled_only, make_loader
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.measure import model_costs
from stillroom.models import FROZEN, load_model, save_model
from stillroom.objective import tapped_layers
from stillroom.pipeline import (
    ROLES,
    _check_term_layers,
    augment_of,
    check_models,
    check_task,
    given_teacher,
    prepare_data,
    train_students,
    train_teacher,
)
from stillroom.results import ModelResult, Summary, describe, gap_note, write_summary
from stillroom.runs import gap_closed, prepare_run_dir, release
from stillroom.store import StoreTeacher
from stillroom.teachers import generate_soft_targets
from stillroom.train import evaluate, predict
from stillroom.train.evaluate import METRICS


@dataclass
class RunResult:
    run_dir: Path
    task: str
    metric: str
    rows: dict[str, dict[str, Any]]
    gap_closed: float | None


def run_recipe(
    recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True, force: bool = False
) -> RunResult:
    """Run every phase of `recipe` into `run_dir` (resuming finished/started phases if asked;
    `force` replaces an earlier run there, once every check has passed)."""
    run_dir = Path(run_dir)
    # everything that can be checked before any training is checked before the run folder exists
    splits, student_train = prepare_data(recipe)
    task = splits.train.task
    check_task(recipe, task)
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    _check_term_layers(recipe, input_shape, num_outputs)
    augment_of(recipe, input_shape, students=False)  # shift/flip need images: said before any file
    students_augmented = augment_of(recipe, input_shape) is not None
    if students_augmented and recipe.teacher.store is not None:
        raise StillroomError(
            "data.augment changes every training batch, but the store holds the teacher's "
            "outputs on the inputs as they are; drop teacher.store (the teacher then runs live on "
            "the augmented batches) or drop data.augment"
        )
    data = recipe.data
    protected = (
        recipe.teacher.checkpoint,
        recipe.teacher.store,
        data.path,
        data.val_path,
        data.test_path,
    )
    given = given_teacher(recipe, splits)  # a checkpoint or another framework's model, checked
    check_models(recipe, splits, given[0] if given else None)
    fresh = not run_dir.exists()
    prepare_run_dir(run_dir, recipe, resume, force, protected)
    atomic_write_json(run_dir / "data.json", splits.record)

    # 1. the teacher: given, or trained on every training label: it stands for the big, accurate
    #    model that already exists; label_fraction limits what the *student* sees
    if given is not None:
        saved, meta = given
        save_model(saved, meta.pop("spec"), run_dir / "teacher", **meta)
        teacher, _ = load_model(run_dir / "teacher")  # in the units the students train in
    else:
        teacher = train_teacher(recipe, run_dir, splits, progress=progress, resume=resume)
    # feature terms read the teacher's intermediate layers at every step: they need it live
    # augmented batches differ from the inputs soft targets were computed on: the teacher
    # must see the same view as the student, so it runs live
    live = bool(tapped_layers(list(recipe.train_args(recipe.distill, task).terms))[1])
    live = live or students_augmented
    store = None
    if recipe.teacher.store is not None and not live:
        try:  # refuses a store made by another teacher or on other inputs, naming which differs
            store = StoreTeacher(recipe.teacher.store, teacher=teacher, data=student_train)
        except StillroomError:
            if fresh:  # the folder this call created goes with it: the refusal writes nothing
                release(run_dir)
                shutil.rmtree(run_dir)
            raise

    # 2. soft targets: the teacher runs once over every training input, labelled or not; not at
    #    all when a store holds them, or when it must run live on every batch anyway
    kd_teacher: Any = teacher if live else store
    if kd_teacher is None:
        soft_targets = generate_soft_targets(
            teacher, make_loader(student_train, 512, shuffle=False)
        )
        soft_targets.save(run_dir / "soft_targets.safetensors")
        kd_teacher = soft_targets

    # 3. the same student architecture, from labels alone and distilled
    students = train_students(
        recipe,
        run_dir,
        kd_teacher,
        splits,
        student_train,
        progress=progress,
        resume=resume,
        equal_steps=recipe.baseline_equal_steps,
    )

    # 4. the comparison on the held-out test split
    test_loader = make_loader(splits.test, 512, shuffle=False)
    teacher_pred = predict(teacher, test_loader)[0]
    rows: dict[str, dict[str, Any]] = {}
    for role, model in {"teacher": teacher, **students}.items():
        frozen = role == "teacher" and recipe.teacher.kind in FROZEN
        weights = (
            Path(recipe.teacher.spec()["path"]) if frozen else run_dir / role / "model.safetensors"
        )
        row = {**evaluate(model, test_loader, task), **model_costs(model, weights, input_shape)}
        if task == "classification" and role != "teacher":
            row["teacher_agreement"] = (
                (predict(model, test_loader)[0].argmax(1) == teacher_pred.argmax(1))
                .float()
                .mean()
                .item()
            )
        rows[role] = row
    metric = METRICS[task][0]
    result = RunResult(run_dir, task, metric, rows, gap_closed(rows, metric))
    write_results(result, recipe, student_train, len(splits.test))
    return result


def write_results(
    result: RunResult, recipe: Recipe, student_train: ArrayData, test_samples: int
) -> None:
    payload = {
        "task": result.task,
        "metric": result.metric,
        "gap_closed": result.gap_closed,
        "train_samples": len(student_train),
        "labelled_train_samples": len(labelled_only(student_train)),
        "test_samples": test_samples,
        "models": result.rows,
    }
    atomic_write_json(result.run_dir / "results.json", payload)
    write_summary(summarize(result, recipe), result.run_dir)
    from stillroom.plots import plot_run  # matplotlib is slow to import; only when writing a run

    plot_run(result)


ROLE_OF = {"teacher": "teacher", "student_scratch": "baseline", "student_kd": "distilled"}


def summarize(result: RunResult, recipe: Recipe, title: str | None = None) -> Summary:
    """The result contract of a classic run."""
    metric, rows = result.metric, result.rows
    higher = METRICS[result.task][1] == "max"
    models = [
        ModelResult(
            name=role,
            role=ROLE_OF[role],  # type: ignore[arg-type]
            metrics={metric: row[metric], "teacher_agreement": row.get("teacher_agreement")},
            folder=role,
            parameters=row["parameters"],
            size_bytes=row["size_bytes"],
            latency_ms=row["latency_ms"],
            architecture=describe((recipe.teacher if role == "teacher" else recipe.student).spec()),
            teacher="teacher" if role == "student_kd" else "",
        )
        for role, row in rows.items()
    ]
    pick = {role: rows[role][metric] if role in rows else None for role in ROLES}
    _, gap_line = gap_note(
        pick["teacher"], pick["student_scratch"], pick["student_kd"], metric, higher
    )
    distill = recipe.distill
    terms = ", ".join(t.kind for t in distill.terms) if distill.terms else "none"
    data = recipe.data
    return Summary(
        method="classic",
        title=title or f"{recipe.name}: test set",
        task=result.task,
        metric=metric,
        higher_is_better=higher,
        models=models,
        settings={
            "data": f"{data.source}"
            + (f" ({data.path})" if data.path else "")
            + f", label_fraction {data.label_fraction}, seed {recipe.seed}",
            "distillation": f"loss {distill.loss}, T {distill.temperature}, alpha {distill.alpha}, "
            f"epochs {distill.epochs}, lr {distill.lr}, extra terms: {terms}",
            "teacher": describe(recipe.teacher.spec()) + _teacher_origin(recipe),
            "student": describe(recipe.student.spec()),
        },
        notes=[gap_line],
        primary="student_kd",
    )


def _teacher_origin(recipe: Recipe) -> str:
    teacher = recipe.teacher
    if teacher.checkpoint is not None:
        return f", loaded from {teacher.checkpoint}"
    if teacher.kind in FROZEN:
        return ", frozen (another framework's model)"
    return f", trained here: epochs {teacher.train.epochs}, lr {teacher.train.lr}"


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise StillroomError(f"{run_dir} holds no results.json; is it a finished stillroom run?")
    return json.loads(path.read_text())
