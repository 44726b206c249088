"""The `distill` workflow behind `stillroom distill RECIPE` and the demo.

    data -> teacher (trained, or loaded from a checkpoint) -> soft targets over the training set
         -> student from labels alone (baseline) and distilled student -> test metrics and costs

Run folder:
    config.yaml                 the resolved recipe (every field)
    teacher/                    model.json + model.safetensors, metrics.jsonl, checkpoints/
    soft_targets.safetensors    the teacher's logits for every training sample (row = sample id)
    student_scratch/            the student trained on labels alone
    student_kd/                 the distilled student
    results.json, results.md    the comparison table; curves.png, size_vs_metric.png
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from stillroom.config import Recipe, dump_recipe
from stillroom.data import (
    ArrayData,
    Splits,
    hide_labels,
    labelled_only,
    load_dataset,
    make_loader,
    split,
)
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.measure import format_bytes, model_costs
from stillroom.models import build_model, load_model, save_model
from stillroom.objective import build_objective, check_layer_names, tapped_layers
from stillroom.store import StoreTeacher
from stillroom.teachers import CachedTeacher, generate_soft_targets
from stillroom.train import TrainArgs, distill, evaluate, predict
from stillroom.train.evaluate import METRICS

ROLES = ("teacher", "student_scratch", "student_kd")


@dataclass
class RunResult:
    run_dir: Path
    task: str
    metric: str
    rows: dict[str, dict[str, Any]]
    gap_closed: float | None


def prepare_data(recipe: Recipe) -> tuple[Splits, ArrayData]:
    """(splits with every label, the training split with only the student's share of labels)."""
    data = load_dataset(recipe.data.source, recipe.data.path)
    splits = split(data, recipe.data.test_fraction, recipe.data.val_fraction, recipe.seed)
    return splits, hide_labels(splits.train, recipe.data.label_fraction, recipe.seed)


def build_seeded(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int, seed: int
) -> torch.nn.Module:
    """Build with a fixed seed: initial weights must not depend on what ran before in the process."""
    torch.manual_seed(seed)
    return build_model(spec, input_shape, num_outputs)


def _check_term_layers(recipe: Recipe, input_shape: tuple[int, ...], num_outputs: int) -> None:
    """Fail on a term's unknown layer name, or on layers a term cannot pair (an adversarial term
    over layers of different shapes), now: not after the teacher has trained."""
    specs = list(recipe.train_args(recipe.distill, "classification").terms)
    student_names, teacher_names = tapped_layers(specs)
    if not (student_names or teacher_names):
        return
    student = build_model(recipe.student.spec(), input_shape, num_outputs)
    if student_names:
        check_layer_names(student, student_names)
    teacher = None
    if teacher_names and recipe.teacher.checkpoint is None:
        teacher = build_model(recipe.teacher.spec(), input_shape, num_outputs)
        check_layer_names(teacher, teacher_names)
    if teacher_names and teacher is None:
        return  # a teacher checkpoint: its layers are checked when the run loads it
    # size every tapped term on a dummy batch; its random draws must not shift the run's seeds
    with torch.random.fork_rng():
        build_objective(specs, "classification", student, teacher, torch.zeros((2, *input_shape)))


def check_task(recipe: Recipe, task: str) -> None:
    fitting = {
        "classification": ("soft_target", "topk_soft_target", "dkd"),
        "regression": ("regression",),
    }[task]
    if recipe.distill.loss not in fitting:
        raise StillroomError(
            f"distill.loss '{recipe.distill.loss}' does not fit the {task} data of "
            f"'{recipe.data.source}'; use distill.loss={' or '.join(fitting)}"
        )


def train_phase(
    name: str,
    run_dir: Path,
    teacher: Any,
    model: torch.nn.Module,
    spec: dict[str, Any],
    train: ArrayData,
    val: ArrayData,
    args: TrainArgs,
    batch_size: int,
    resume: bool,
) -> torch.nn.Module:
    if len(train) == 0:
        raise StillroomError(f"{name}: no labelled training samples; raise data.label_fraction")
    result = distill(
        teacher,
        model,
        make_loader(train, batch_size, shuffle=True),
        make_loader(val, 512, shuffle=False),
        run_dir=run_dir / name,
        resume=resume,
        args=args,
    )
    save_model(
        result.student,
        spec,
        run_dir / name,
        input_shape=list(train.input_shape),
        num_outputs=train.num_outputs,
    )
    return result.student


def train_teacher(
    recipe: Recipe,
    run_dir: Path,
    splits: Splits,
    *,
    name: str = "teacher",
    progress: bool = True,
    resume: bool = False,
) -> torch.nn.Module:
    """The recipe's teacher trained on every training label into `run_dir/name`: it stands for the
    big, accurate model that already exists (label_fraction limits only what students see)."""
    task, spec = splits.train.task, recipe.teacher.spec()
    args = recipe.train_args(
        recipe.teacher.train, task, alpha=0.0, progress=progress, description=name
    )
    model = build_seeded(spec, splits.train.input_shape, splits.train.num_outputs, recipe.seed)
    return train_phase(
        name,
        run_dir,
        None,
        model,
        spec,
        splits.train,
        splits.val,
        args,
        recipe.data.batch_size,
        resume,
    )


def train_students(
    recipe: Recipe,
    run_dir: Path,
    kd_teacher: Any,
    splits: Splits,
    student_train: ArrayData,
    *,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, torch.nn.Module]:
    """The recipe's student architecture from labels alone (student_scratch/, when
    recipe.baseline) and distilled from `kd_teacher` (student_kd/), identically initialised."""
    task, spec = splits.train.task, recipe.student.spec()
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    students: dict[str, torch.nn.Module] = {}
    if recipe.baseline:
        scratch_args = recipe.train_args(
            recipe.distill, task, alpha=0.0, terms=(), progress=progress, description="scratch"
        )
        # without a teacher only the labelled samples carry any signal
        students["student_scratch"] = train_phase(
            "student_scratch",
            run_dir,
            None,
            build_seeded(spec, input_shape, num_outputs, recipe.seed),
            spec,
            labelled_only(student_train),
            splits.val,
            scratch_args,
            recipe.data.batch_size,
            resume,
        )
    kd_args = recipe.train_args(recipe.distill, task, progress=progress, description="distill")
    students["student_kd"] = train_phase(
        "student_kd",
        run_dir,
        kd_teacher,
        build_seeded(spec, input_shape, num_outputs, recipe.seed),
        spec,
        student_train,
        splits.val,
        kd_args,
        recipe.data.batch_size,
        resume,
    )
    return students


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
    protected = (recipe.teacher.checkpoint, recipe.teacher.store, recipe.data.path)
    prepare_run_dir(run_dir, recipe, resume, force, protected)

    # 1. the teacher: loaded, or trained on every training label: it stands for the big, accurate
    #    model that already exists; label_fraction limits what the *student* sees
    if recipe.teacher.checkpoint is not None:
        teacher, meta = load_model(recipe.teacher.checkpoint)
        if tuple(meta["input_shape"]) != input_shape or meta["num_outputs"] != num_outputs:
            raise StillroomError(
                f"teacher {recipe.teacher.checkpoint} takes inputs {tuple(meta['input_shape'])} with "
                f"{meta['num_outputs']} outputs, but the data has {input_shape} and {num_outputs}"
            )
        save_model(
            teacher,
            meta["spec"],
            run_dir / "teacher",
            input_shape=list(input_shape),
            num_outputs=num_outputs,
        )
    else:
        teacher = train_teacher(recipe, run_dir, splits, progress=progress, resume=resume)

    # 2. soft targets: the teacher runs once over every training input, labelled or not
    soft_targets = generate_soft_targets(teacher, make_loader(student_train, 512, shuffle=False))
    soft_targets.save(run_dir / "soft_targets.safetensors")

    # 3. the same student architecture, from labels alone and distilled
    # feature terms read the teacher's intermediate layers at every step: they need it live
    if tapped_layers(list(recipe.train_args(recipe.distill, task).terms))[1]:
        kd_teacher: Any = teacher
    elif recipe.teacher.store is not None:
        # refuses a store made by another teacher or on other inputs, naming which differs
        kd_teacher = StoreTeacher(recipe.teacher.store, teacher=teacher, data=student_train)
    else:
        kd_teacher = CachedTeacher(soft_targets.outputs)
    students = train_students(
        recipe, run_dir, kd_teacher, splits, student_train, progress=progress, resume=resume
    )

    # 4. the comparison on the held-out test split
    test_loader = make_loader(splits.test, 512, shuffle=False)
    teacher_pred = predict(teacher, test_loader)[0]
    rows: dict[str, dict[str, Any]] = {}
    for role, model in {"teacher": teacher, **students}.items():
        row = {
            **evaluate(model, test_loader, task),
            **model_costs(model, run_dir / role / "model.safetensors", input_shape),
        }
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
    write_results(result, student_train, len(splits.test))
    return result


LOWER_IS_BETTER = {name for name, direction in METRICS.values() if direction == "min"}


def gap_closed(rows: dict[str, dict[str, Any]], metric: str) -> float | None:
    """(kd - scratch) / (teacher - scratch): the share of the teacher's lead the distillation
    recovers. None without a scratch student, or when the teacher does not lead (the ratio would
    be meaningless). `metric` may be "<output>/<metric>" (multi-task)."""
    if "student_scratch" not in rows:
        return None
    lead = rows["teacher"][metric] - rows["student_scratch"][metric]
    lower_is_better = metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER
    if not (lead < -1e-12 if lower_is_better else lead > 1e-12):
        return None
    return (rows["student_kd"][metric] - rows["student_scratch"][metric]) / lead


def check_run_dir_free(run_dir: Path, resume: bool, force: bool) -> None:
    """Fail fast, before data is read and models built, on a run folder that is taken (the full
    check, and --force's removal, come after every other check has passed)."""
    if resume and force:
        raise StillroomError("--resume and --force contradict each other; pass one")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (resume or force):
        claim_run_dir(run_dir, force=False)


def claim_run_dir(run_dir: Path, force: bool, protected: tuple[Path | None, ...] = ()) -> None:
    """Make sure `run_dir` can be written: absent or empty, or (with force) an earlier stillroom run,
    which is then removed. Never removes a folder that holds inputs of the new run (`protected`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise StillroomError(f"run folder {run_dir} is a file; choose another --out")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not force:
        raise StillroomError(
            f"run folder {run_dir} already exists; pass --resume to continue it, --force to replace it, "
            "or choose another --out"
        )
    if not ((run_dir / "config.yaml").is_file() or (run_dir / "demo.json").is_file()):
        raise StillroomError(
            f"--force only replaces a stillroom run folder, and {run_dir} holds no config.yaml; "
            "choose another --out"
        )
    for path in protected:
        if path is not None and Path(path).resolve().is_relative_to(run_dir.resolve()):
            raise StillroomError(
                f"--force would delete {path}, which this run reads; copy it out of {run_dir} "
                "or choose another --out"
            )
    shutil.rmtree(run_dir)


def prepare_run_dir(
    run_dir: Path,
    recipe: BaseModel,
    resume: bool,
    force: bool,
    protected: tuple[Path | None, ...] = (),
) -> None:
    """A fresh run folder holding the resolved recipe as config.yaml, or (resume) one started with
    the same recipe. `force` replaces an earlier run, never deleting the `protected` inputs."""
    config_path = run_dir / "config.yaml"
    if resume and force:
        raise StillroomError("--resume and --force contradict each other; pass one")
    if resume:
        if not config_path.is_file():
            raise StillroomError(
                f"nothing to resume in {run_dir}: it holds no config.yaml from an earlier run"
            )
        if config_path.read_text() != dump_recipe(recipe):
            raise StillroomError(
                f"the recipe differs from the one {run_dir} was started with (see its config.yaml); "
                "resume with the same recipe and overrides, or start a new run folder"
            )
        return
    claim_run_dir(run_dir, force, protected)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, dump_recipe(recipe))


def write_results(result: RunResult, student_train: ArrayData, test_samples: int) -> None:
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
    atomic_write_text(result.run_dir / "results.md", results_table(result) + "\n")
    from stillroom.plots import plot_run  # matplotlib is slow to import; only when writing a run

    plot_run(result)


def results_table(result: RunResult) -> str:
    """Markdown table: the task metric, size and latency of each model, and the gap closed."""
    metric = result.metric
    lines = [
        f"| model | test {metric} | parameters | size on disk | CPU latency (batch 1) | agreement with teacher |",
        "|---|---|---|---|---|---|",
    ]
    teacher = result.rows["teacher"]
    for role, row in result.rows.items():
        value = f"{row[metric]:.4f}"
        ratio = teacher["parameters"] / row["parameters"]
        size = format_bytes(row["size_bytes"])
        speed = teacher["latency_ms"] / row["latency_ms"]
        agreement = f"{row['teacher_agreement']:.3f}" if "teacher_agreement" in row else "-"
        params = f"{row['parameters']:,}" + (
            f" ({ratio:.0f}x smaller)" if role != "teacher" else ""
        )
        latency = f"{row['latency_ms']:.3f} ms" + (
            f" ({speed:.1f}x faster)" if role != "teacher" else ""
        )
        lines.append(f"| {role} | {value} | {params} | {size} | {latency} | {agreement} |")
    gap = "n/a" if result.gap_closed is None else f"{result.gap_closed:.2f}"
    lines.append("")
    lines.append(f"gap closed = (kd - scratch) / (teacher - scratch) = {gap}")
    return "\n".join(lines)


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise StillroomError(f"{run_dir} holds no results.json; is it a finished stillroom run?")
    return json.loads(path.read_text())
