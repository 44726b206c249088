"""`method: interpretable`: a network teacher distilled into students a person can read.

    data -> teacher (trained here from `teacher:`, or loaded: a checkpoint, ONNX, scikit-learn)
         -> transfer set: the training inputs + `students.generated` samples drawn near them,
            every one labelled by the teacher (born-again trees: Breiman & Shang 1996; model
            compression: Bucilua et al. 2006)
         -> per kind in `students.kinds` (tree, rule_list, sparse_linear; see
            stillroom.interpretable.students.STUDENTS): the model fitted to the labels alone
            (<kind>_labels) and to the teacher (<kind>_distilled)
         -> test: accuracy, fidelity (top-1 agreement with the teacher), depth / leaves / rules /
            non-zeros, size, CPU latency (batch 1); the rules as text

Run folder (`stillroom distill recipes/digits_interpretable.yaml`):
    config.yaml, data.json        the resolved recipe; how the data was read
    teacher/                      model.json + model.safetensors (+ the loop's files), done.json
    <kind>_labels/, <kind>_distilled/
                                  model.skops (scikit-learn, no pickle), student.json, rules.txt,
                                  done.json
    texts/rules.md                every student's rules, one section each (the report shows it)
    results.json, summary.json, results.md

`stillroom export RUN_DIR` converts the primary student (the distilled tree) to ONNX with
skl2onnx and checks it on the test split; `stillroom export RUN_DIR/<kind>_<how>` any other.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stillroom.config import RecipeBase, TeacherSection
from stillroom.data import labelled_only, to_user_units
from stillroom.data.section import DataSection
from stillroom.errors import StillroomError
from stillroom.interpretable.files import (
    RULES,
    SKLEARN_MODEL,
    load_student,
    save_student,
)
from stillroom.interpretable.students import STUDENTS, Fitting, generate_near, scores
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.measure import model_costs
from stillroom.models import FROZEN, build_model, load_model, save_model
from stillroom.pipeline import (
    _output_shape,
    data_classes,
    given_teacher,
    prepare_data,
    train_teacher,
)
from stillroom.results import ModelResult, Summary, describe, write_summary
from stillroom.runs import is_complete, mark_complete, prepare_run_dir
from stillroom.teachers import FrozenTeacher

StudentName = Literal[tuple(STUDENTS)]  # type: ignore[valid-type]  # the table is the one list
WAYS = ("labels", "distilled")


class StudentsSection(BaseModel):
    """Which interpretable students, how big, and how the teacher's transfer set is made."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[StudentName] = Field(
        ["tree", "sparse_linear"],
        description="students fitted to the labels and to the teacher: tree, rule_list (two "
        "classes), sparse_linear",
    )
    max_depth: int = Field(
        8, ge=1, le=64, description="tree: its depth; rule_list: at most this many rules"
    )
    min_samples_leaf: int = Field(1, ge=1, le=1_000_000, description="tree: samples per leaf")
    temperature: float = Field(
        1.0, gt=0, le=1e3, allow_inf_nan=False,
        description="the distilled tree fits softmax(teacher logits / T)",
    )  # fmt: skip
    generated: int = Field(
        20_000,
        ge=0,
        le=10_000_000,
        description="samples drawn near the training inputs (Gaussian noise, clipped to each "
        "feature's range) and labelled by the teacher, added to the distilled students' data",
    )
    noise: float = Field(
        0.3, ge=0, le=10, allow_inf_nan=False,
        description="std of that noise, in units of each feature's std",
    )  # fmt: skip
    C: float = Field(
        0.1, gt=0, le=1e6, allow_inf_nan=False,
        description="sparse_linear on labels: inverse L1 strength of the logistic regression",
    )  # fmt: skip
    lasso_alpha: float = Field(
        0.02, gt=0, le=1e6, allow_inf_nan=False,
        description="sparse_linear distilled: L1 strength of the Lasso on the teacher's logits",
    )  # fmt: skip
    max_iter: int = Field(2000, ge=1, le=1_000_000, description="sparse_linear: solver iterations")

    @field_validator("kinds")
    @classmethod
    def _some_distinct(cls, kinds: list[str]) -> list[str]:
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"name each student once, at least one of {', '.join(STUDENTS)}")
        return kinds

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"kinds", "generated", "noise", "temperature"})


class InterpretableRecipe(RecipeBase):
    """A network teacher and the interpretable students distilled from it."""

    method: Literal["interpretable"] = Field(
        "interpretable", description="a teacher distilled into a tree, a rule list, a sparse model"
    )
    name: str = "digits_interpretable"
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    students: StudentsSection = StudentsSection()
    absent: ClassVar[dict[str, str]] = {
        "student": "an interpretable recipe names its students in 'students.kinds' (tree, "
        "rule_list, sparse_linear); remove the 'student' section",
        "distill": "an interpretable recipe fits its students in closed form; their settings are "
        "in 'students' (max_depth, temperature, generated, ...): remove 'distill'",
    }


def _check(recipe: InterpretableRecipe, splits: Any, given: Any) -> None:
    """What would fail after the teacher has trained fails now, in one line."""
    train = splits.train
    if train.task != "classification":
        raise StillroomError(
            f"method interpretable distils classifiers, and '{recipe.data.source}' is {train.task}"
            " data; use a classification label (data.task: classification)"
        )
    if recipe.teacher.store is not None:
        raise StillroomError(
            "teacher.store: interpretable students are fitted on teacher outputs over generated "
            "samples too, which no store holds; remove teacher.store"
        )
    if "rule_list" in recipe.students.kinds and train.num_outputs != 2:
        raise StillroomError(
            f"students.kinds: rule_list (imodels' greedy rule list) separates two classes and the "
            f"data has {train.num_outputs}; drop rule_list for this data"
        )
    with torch.random.fork_rng():
        teacher = given or build_model(recipe.teacher.spec(), train.input_shape, train.num_outputs)
    shape = _output_shape("teacher", teacher, train.input_shape)
    if len(shape) != 2 or shape[1] != train.num_outputs:
        raise StillroomError(
            f"the teacher gives outputs of shape {shape[1:]} per sample; a tree, rule list or "
            f"linear student fits one score per class, ({train.num_outputs},): give a teacher that"
            " returns (N, classes) logits"
        )


@torch.no_grad()
def teacher_logits(
    teacher: torch.nn.Module, x: np.ndarray, input_shape: tuple[int, ...]
) -> np.ndarray:
    """(N, C) logits of the frozen teacher (taking the user's units) on flat inputs (N, F)."""
    frozen = FrozenTeacher(teacher)
    out = []
    for start in range(0, len(x), 2048):
        batch = torch.from_numpy(x[start : start + 2048]).float().reshape(-1, *input_shape)
        out.append(frozen(batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _feature_names(splits: Any) -> list[str]:
    """Column names of a table (one per flattened feature), pixel[row,col] for 1-channel images,
    x[i] otherwise."""
    shape, features = splits.train.input_shape, math.prod(splits.train.input_shape)
    columns = ((splits.record or {}).get("encoding") or {}).get("input_columns")
    if isinstance(columns, list) and len(columns) == features:
        return [str(c) for c in columns]
    if len(shape) == 3 and shape[0] == 1:
        return [f"pixel[{r},{c}]" for r in range(shape[1]) for c in range(shape[2])]
    return [f"x[{i}]" for i in range(features)]


def _latency_ms(estimator: Any, x: np.ndarray, repeats: int = 50) -> float:
    """Median milliseconds of one prediction of one sample (CPU, scikit-learn)."""
    one = np.asarray(x[:1], dtype=np.float32)
    for _ in range(5):
        scores(estimator, one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores(estimator, one)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def run_interpretable(
    recipe: InterpretableRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Summary:
    """Train (or load) the teacher, label the transfer set, fit every student both ways, write
    the table. A finished student (done.json) is loaded on --resume, not fitted again."""
    run_dir = Path(run_dir)
    splits, student_train = prepare_data(recipe)  # type: ignore[arg-type]
    given = given_teacher(recipe, splits)  # type: ignore[arg-type]
    _check(recipe, splits, given[0] if given else None)
    data = recipe.data
    protected = (recipe.teacher.checkpoint, data.path, data.val_path, data.test_path)
    prepare_run_dir(run_dir, recipe, resume, force, protected)
    atomic_write_json(run_dir / "data.json", splits.record)

    # 1. the teacher, saved in the run folder either way
    input_shape, classes = splits.train.input_shape, splits.train.num_outputs
    if is_complete(run_dir / "teacher"):
        pass
    elif given is not None:
        saved, meta = given
        save_model(saved, meta.pop("spec"), run_dir / "teacher", **meta)
        mark_complete(run_dir / "teacher")
    else:
        train_teacher(recipe, run_dir, splits, progress=progress, resume=resume)  # type: ignore[arg-type]
    teacher, _ = load_model(run_dir / "teacher", user_units=True)  # takes the user's units

    # 2. the transfer set, in the user's units (so every threshold reads as the data does)
    def flat(split: Any) -> np.ndarray:
        x = to_user_units(split).inputs
        return x.reshape(len(split), -1).numpy().astype(np.float32)

    labelled = labelled_only(student_train)
    x_labelled, y_labelled = flat(labelled), labelled.targets.numpy()
    x_train = flat(student_train)  # labelled or not: the teacher labels them all
    x_test, y_test = flat(splits.test), splits.test.targets.numpy()
    section = recipe.students
    transfer = np.concatenate(
        [x_train, generate_near(x_train, section.generated, section.noise, recipe.seed)]
    )
    logits = teacher_logits(teacher, transfer, input_shape)
    teacher_test = teacher_logits(teacher, x_test, input_shape).argmax(1)
    to_teacher = Fitting(transfer, logits.argmax(1), _softmax(logits, section.temperature), logits)
    to_labels = Fitting(x_labelled, y_labelled)
    names = _feature_names(splits)
    class_names = data_classes(splits) or [str(k) for k in range(classes)]

    # 3. every student, both ways
    rows: dict[str, dict[str, Any]] = {}
    rules: list[str] = []
    for kind in section.kinds:
        row_kind = STUDENTS[kind]
        for way in WAYS:
            name = f"{kind}_{way}"
            folder = run_dir / name
            if is_complete(folder):
                estimator, _ = load_student(folder)
            else:
                fit = row_kind.fit_labels if way == "labels" else row_kind.fit_teacher
                estimator = fit(
                    to_labels if way == "labels" else to_teacher, classes, section.options()
                )
                info = {
                    "kind": kind,
                    "fitted_to": "labels" if way == "labels" else "teacher",
                    "features": x_train.shape[1],
                    "feature_names": names,
                    "classes": class_names,
                    "input_shape": list(input_shape),
                    "input_min": x_train.min(0).tolist(),
                    "input_max": x_train.max(0).tolist(),
                    "size": row_kind.size(estimator),
                }
                save_student(estimator, folder, info, row_kind.rules(estimator, names, class_names))
                mark_complete(folder)
            predicted = scores(estimator, x_test).argmax(1)
            size = row_kind.size(estimator)
            rows[name] = {
                "kind": kind,
                "fitted_to": way,
                "accuracy": float((predicted == y_test).mean()),
                "fidelity": float((predicted == teacher_test).mean()),
                **size,
                "parameters": size["nonzeros"]
                if size["nonzeros"] is not None
                else int(estimator.tree_.node_count),
                "size_bytes": (folder / SKLEARN_MODEL).stat().st_size,
                "latency_ms": _latency_ms(estimator, x_test),
            }
            rules += [f"## {name}", "", "```", (folder / RULES).read_text().rstrip(), "```", ""]
    (run_dir / "texts").mkdir(exist_ok=True)
    atomic_write_text(run_dir / "texts" / "rules.md", "\n".join(rules))

    teacher_model, _ = load_model(run_dir / "teacher")
    frozen = recipe.teacher.kind in FROZEN
    weights = (
        Path(recipe.teacher.spec()["path"]) if frozen else run_dir / "teacher" / "model.safetensors"
    )
    rows = {
        "teacher": {
            "accuracy": float((teacher_test == y_test).mean()),
            **model_costs(teacher_model, weights, input_shape),
        },
        **rows,
    }
    atomic_write_json(
        run_dir / "results.json",
        {
            "task": "classification",
            "metric": "accuracy",
            "transfer_samples": len(transfer),
            "generated_samples": section.generated,
            "test_samples": len(x_test),
            "models": rows,
        },
    )
    summary = summarize(recipe, rows, run_dir)
    write_summary(summary, run_dir)
    return summary


def summarize(
    recipe: InterpretableRecipe, rows: dict[str, dict[str, Any]], run_dir: Path
) -> Summary:
    """The teacher, then each student fitted to the labels and to the teacher."""
    section = recipe.students
    models = [
        ModelResult(
            name="teacher",
            role="teacher",
            metrics={"accuracy": rows["teacher"]["accuracy"]},
            folder="teacher",
            parameters=rows["teacher"]["parameters"],
            size_bytes=rows["teacher"]["size_bytes"],
            latency_ms=rows["teacher"]["latency_ms"],
            architecture=describe(recipe.teacher.spec()),
        )
    ]
    notes = []
    for name, row in rows.items():
        if name == "teacher":
            continue
        distilled = row["fitted_to"] == "distilled"
        models.append(
            ModelResult(
                name=name,
                role="distilled" if distilled else "baseline",
                metrics={
                    "accuracy": row["accuracy"],
                    "fidelity": row["fidelity"],
                    "depth": row["depth"],
                    "leaves": row["leaves"],
                    "rules": row["rules"],
                    "nonzeros": row["nonzeros"],
                },
                folder=name,
                parameters=row["parameters"],
                size_bytes=row["size_bytes"],
                latency_ms=row["latency_ms"],
                architecture=row["kind"].replace("_", " "),
                teacher="teacher" if distilled else "",
            )
        )
        if distilled:
            base = rows[f"{row['kind']}_labels"]
            notes.append(
                f"{row['kind']}: distilled {row['accuracy']:.4f} vs labels {base['accuracy']:.4f} "
                f"({100 * (row['accuracy'] - base['accuracy']):+.1f} points), fidelity "
                f"{row['fidelity']:.4f} vs {base['fidelity']:.4f}"
            )
    notes.append(
        "fidelity: share of test samples given the teacher's top-1 class; parameters: tree "
        "nodes or non-zero weights; the rules of each student: <folder>/rules.txt, all in texts/rules.md"
    )
    kinds = [k for k in section.kinds]
    primary = "tree_distilled" if "tree" in kinds else f"{kinds[0]}_distilled"
    data = recipe.data
    return Summary(
        method="interpretable",
        title=f"{recipe.name}: interpretable students, test set",
        task="classification",
        metric="accuracy",
        higher_is_better=True,
        models=models,
        settings={
            "data": f"{data.source}"
            + (f" ({data.path})" if data.path else "")
            + f", label_fraction {data.label_fraction}, seed {recipe.seed}",
            "teacher": describe(recipe.teacher.spec()),
            "students": f"{', '.join(kinds)}; max_depth {section.max_depth}, T "
            f"{section.temperature}, {section.generated} generated samples (noise "
            f"{section.noise} std), C {section.C}, lasso_alpha {section.lasso_alpha}",
        },
        notes=notes,
        primary=primary,
    )
