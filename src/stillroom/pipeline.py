"""The phases the array-data methods share: reading the data, checking teacher and student
against it, training one phase into its folder, the teacher, and a scratch/distilled student pair.

The classic workflow built from them is methods/classic.py; self-distillation, born-again chains,
ensembles and multi-task runs call the same functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from stillroom.config import Recipe
from stillroom.data import (
    ArrayData,
    Splits,
    hide_labels,
    labelled_only,
    make_loader,
    prepare_splits,
)
from stillroom.data.augment import Augment
from stillroom.errors import StillroomError
from stillroom.models import FROZEN, build_model, load_model, save_model
from stillroom.objective import build_objective, check_layer_names, tapped_layers
from stillroom.runs import mark_complete
from stillroom.train import TrainArgs, distill

ROLES = ("teacher", "student_scratch", "student_kd")


def prepare_data(recipe: Recipe) -> tuple[Splits, ArrayData]:
    """(splits with every label, the training split with only the student's share of labels)."""
    splits = prepare_splits(recipe.data, recipe.seed)
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
    if teacher_names and recipe.teacher.kind in FROZEN:
        raise StillroomError(
            f"a teacher.kind '{recipe.teacher.kind}' model exposes no layers, and a term reads "
            f"teacher layer(s) {', '.join(teacher_names)}; use output terms (soft_target, dkd) "
            "or a PyTorch teacher"
        )
    if teacher_names and recipe.teacher.checkpoint is None:
        teacher = build_model(recipe.teacher.spec(), input_shape, num_outputs)
        check_layer_names(teacher, teacher_names)
    if teacher_names and teacher is None:
        return  # a teacher checkpoint: its layers are checked when the run loads it
    # size every tapped term on a dummy batch; its random draws must not shift the run's seeds
    with torch.random.fork_rng():
        build_objective(specs, "classification", student, teacher, torch.zeros((2, *input_shape)))


def _output_shape(name: str, model: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple:
    with torch.random.fork_rng(), torch.no_grad():  # a probe: the run's random draws stay put
        try:
            out = model.eval()(torch.zeros((2, *input_shape)))
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise StillroomError(
                f"the {name} cannot take the data's inputs of shape {input_shape}: {last}; "
                "change the model or data.image_size / data.inputs"
            ) from None
    if not isinstance(out, torch.Tensor):
        raise StillroomError(
            f"the {name} returns a {type(out).__name__}, not one tensor of outputs; return the "
            "logits (or predictions) tensor from forward"
        )
    return tuple(out.shape)


def check_models(recipe: Recipe, splits: Splits, given: torch.nn.Module | None) -> None:
    """Build the student, and the teacher unless `given`, and run each on a probe batch: a
    factory that fails, a model that does not take these inputs, or teacher and student outputs
    of different shapes are one line now, before the run folder exists."""
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    with torch.random.fork_rng():
        student = build_model(recipe.student.spec(), input_shape, num_outputs)
        teacher = given or build_model(recipe.teacher.spec(), input_shape, num_outputs)
    student_out = _output_shape("student", student, input_shape)
    teacher_out = _output_shape("teacher", teacher, input_shape)
    if student_out != teacher_out or student_out[1:2] != (num_outputs,):
        raise StillroomError(
            f"the teacher gives outputs of shape {teacher_out[1:]} and the student {student_out[1:]}"
            f" per sample, but the data needs ({num_outputs},); make both end in {num_outputs} "
            "outputs"
        )


def data_classes(splits: Splits) -> list[str] | None:
    """The class names of classification data, in class-id order (None: ids are the names)."""
    record = splits.record or {}
    for key in ("encoding", "images"):
        if isinstance(record.get(key), dict) and record[key].get("classes"):
            return list(record[key]["classes"])
    return None


def load_fitting(
    checkpoint: Path, input_shape: tuple[int, ...], num_outputs: int, who: str = "teacher", why=""
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A saved stillroom model that takes the data's inputs and gives its outputs, or one line
    naming both (every method's "the teacher checkpoint fits the data" check)."""
    model, meta = load_model(checkpoint)
    if tuple(meta["input_shape"]) != tuple(input_shape) or meta["num_outputs"] != num_outputs:
        raise StillroomError(
            f"{who} {checkpoint} takes inputs {tuple(meta['input_shape'])} with "
            f"{meta['num_outputs']} outputs, but the data {why}has {tuple(input_shape)} and "
            f"{num_outputs}"
        )
    return model, meta


def given_teacher(recipe: Recipe, splits: Splits) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The recipe's teacher when it is not trained here: a stillroom checkpoint, or a model from
    another framework (ONNX, scikit-learn). Returns (module, its model.json) after checking that
    it fits the data, so a mismatch is one line before the run folder is written."""
    section, train = recipe.teacher, splits.train
    input_shape, num_outputs = train.input_shape, train.num_outputs
    if section.checkpoint is not None:
        teacher, meta = load_fitting(section.checkpoint, input_shape, num_outputs)
        return teacher, {**meta, "input_shape": list(input_shape), "num_outputs": num_outputs}
    if section.kind not in FROZEN:
        return None
    spec = section.spec()
    if section.kind == "sklearn":
        spec.update(task=train.task, classes=data_classes(splits))
    teacher = build_model(spec, input_shape, num_outputs)
    teacher.check_fits(input_shape, num_outputs)
    # it reads the data as the user gave it: the run saves the standardisation beside it
    meta = {"spec": spec, "input_shape": list(input_shape), "num_outputs": num_outputs}
    return teacher, {**meta, "preprocess": train.preprocess}


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
    augment: Augment | None = None,
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
        batch_transform=augment,  # training batches only: validation sees the data as it is
    )
    save_model(
        result.student,
        spec,
        run_dir / name,
        input_shape=list(train.input_shape),
        num_outputs=train.num_outputs,
        preprocess=train.preprocess,
    )
    mark_complete(run_dir / name)
    return result.student


def augment_of(
    recipe: Recipe, input_shape: tuple[int, ...], students: bool = True
) -> Augment | None:
    """The recipe's training-time augmentation of the teacher's (students=False) or the
    students' training batches; None when it asks for none there."""
    section = recipe.data.augment
    wanted = section.active and (section.students or not students)
    return Augment(section, input_shape, recipe.seed) if wanted else None


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
        augment_of(recipe, splits.train.input_shape, students=False),
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
    equal_steps: bool = False,
) -> dict[str, torch.nn.Module]:
    """The recipe's student architecture from labels alone (student_scratch/, when
    recipe.baseline) and distilled from `kd_teacher` (student_kd/), identically initialised.
    equal_steps: the scratch student trains as many optimizer steps as the distilled one."""
    task, spec = splits.train.task, recipe.student.spec()
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    students: dict[str, torch.nn.Module] = {}
    augment = augment_of(recipe, input_shape)
    if recipe.baseline:
        labelled = labelled_only(student_train)
        epochs = recipe.distill.epochs
        if equal_steps and len(labelled):
            # as many optimizer steps as the distilled student, which sees every sample
            epochs = math.ceil(epochs * len(student_train) / len(labelled))
        scratch_args = recipe.train_args(
            recipe.distill,
            task,
            alpha=0.0,
            terms=(),
            epochs=epochs,
            progress=progress,
            description="scratch",
        )
        # without a teacher only the labelled samples carry any signal
        students["student_scratch"] = train_phase(
            "student_scratch",
            run_dir,
            None,
            build_seeded(spec, input_shape, num_outputs, recipe.seed),
            spec,
            labelled,
            splits.val,
            scratch_args,
            recipe.data.batch_size,
            resume,
            augment,
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
        augment,
    )
    return students
