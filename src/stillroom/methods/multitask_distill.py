"""Per-task distillation of multi-head models: the Python API behind `method: multitask`.

A student and a teacher whose forward returns {task: outputs} (e.g. `stillroom.models.MultiTaskNet`)
are trained with two explicit terms per task t, summed:

    loss = sum_t w_t * (alpha_t * KD_t(student_t, teacher_t) + (1 - alpha_t) * hard_label_t)

KD_t is the soft-target KL * T_t**2 (Hinton et al. 2015, arXiv:1503.02531) or DKD (Zhao et al.
2022, arXiv:2203.08679) for classification heads, MSE to the teacher's values for regression heads.
A sample without a label for t adds nothing to hard_label_t (IGNORE_INDEX / NaN are masked) but
still gets the teacher's output for t. The terms go to the one loop, `stillroom.train.distill`,
which logs train/<task>/<term> and val/<task>/<metric>.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors
from stillroom.objective import DEFAULT_TEMPERATURE, DkdSpec, TermSpec, field_default, to_device
from stillroom.teachers import CachedTeacher, FrozenTeacher, Teacher
from stillroom.train import TrainArgs, distill
from stillroom.train.loop import DistillResult

TASK_LOSSES = {"classification": ("soft_target", "dkd"), "regression": ("regression",)}
"""The distillation terms that fit each task kind; the first is the default."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: the output (head) `name` reads, its kind and how it is distilled.

    weight: w_t in the summed loss. alpha: share of the distillation term within the task.
    temperature: softens classification outputs (unused for regression). loss: soft_target or dkd
    (classification), regression (regression); None picks the first that fits.
    """

    name: str
    kind: str
    weight: float = 1.0
    alpha: float = 0.9
    temperature: float = DEFAULT_TEMPERATURE
    loss: str | None = None
    dkd_alpha: float = field_default(DkdSpec, "dkd_alpha")
    dkd_beta: float = field_default(DkdSpec, "dkd_beta")

    @property
    def kd_loss(self) -> str:
        return self.loss or TASK_LOSSES[self.kind][0]


def check_tasks(tasks: list[TaskSpec]) -> None:
    """Refuse an empty list, duplicate names, unknown kinds and losses that do not fit the kind."""
    if not tasks:
        raise StillroomError("give at least one task")
    names = [t.name for t in tasks]
    for task in tasks:
        if names.count(task.name) > 1:
            raise StillroomError(f"task {task.name!r} is listed twice; give each task one entry")
        if task.kind not in TASK_LOSSES:
            raise StillroomError(
                f"task {task.name!r}: kind must be one of {', '.join(TASK_LOSSES)}, got {task.kind!r}"
            )
        if task.kd_loss not in TASK_LOSSES[task.kind]:
            raise StillroomError(
                f"task {task.name!r}: loss {task.kd_loss!r} does not fit a {task.kind} task; use "
                f"{' or '.join(TASK_LOSSES[task.kind])}"
            )
        if not (task.weight >= 0 and 0 <= task.alpha <= 1 and task.temperature > 0):
            raise StillroomError(
                f"task {task.name!r}: need weight >= 0, 0 <= alpha <= 1, temperature > 0; got "
                f"{task.weight}, {task.alpha}, {task.temperature}"
            )


def multitask_terms(tasks: list[TaskSpec], with_teacher: bool = True) -> list[TermSpec]:
    """Two terms per task, named `<task>/<loss>` and `<task>/hard_label` (logged as train/<name>):
    w * alpha * KD and w * (1 - alpha) * hard label. Without a teacher: w * hard label alone."""
    terms = []
    for t in tasks:
        hard = TermSpec(
            "hard_label", t.weight, output=t.name, task=t.kind, name=f"{t.name}/hard_label"
        )
        if not with_teacher:
            terms.append(hard)
            continue
        kd_fields = {  # the parameters each kind of TASK_LOSSES has
            "soft_target": {"temperature": t.temperature},
            "dkd": {"temperature": t.temperature, "dkd_alpha": t.dkd_alpha, "dkd_beta": t.dkd_beta},
            "regression": {"task": t.kind},
        }[t.kd_loss]
        kd = TermSpec(
            t.kd_loss, t.weight * t.alpha, output=t.name, name=f"{t.name}/{t.kd_loss}", **kd_fields
        )
        terms += [kd, replace(hard, weight=t.weight * (1.0 - t.alpha))]
    return terms


def _outputs_of(model: nn.Module | Teacher, inputs: Any, index: Any) -> Any:
    """One batch through a module (eval mode, no gradients, training flags restored) or a teacher."""
    if not isinstance(model, nn.Module):
        return model(inputs, index)
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(to_device(inputs, next(model.parameters()).device))
    finally:
        for module, flag in flags.items():
            module.train(flag)


def check_outputs(
    student: nn.Module, teacher: nn.Module | Teacher | None, tasks: list[TaskSpec], batch: Any
) -> None:
    """Before training: every task has a head on the student (and teacher), of matching shapes.
    `batch` is one (inputs, targets, index) batch of the training loader."""
    inputs, _, index = batch
    shapes: dict[str, tuple[int, ...]] = {}
    for whose, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        outputs = _outputs_of(model, inputs, index)
        if not isinstance(outputs, dict):
            raise StillroomError(
                f"the {whose} returns one {type(outputs).__name__}, not a dict of task outputs; a "
                "multi-task model's forward returns {task: outputs} (e.g. stillroom.models.MultiTaskNet)"
            )
        for task in tasks:
            if task.name not in outputs:
                raise StillroomError(
                    f"the {whose} has no head for task {task.name!r}; its heads: "
                    f"{', '.join(outputs) or 'none'}. Give it a {task.name!r} head, or drop the task"
                )
            shape = tuple(outputs[task.name].shape[1:])
            if task.kind == "classification" and (len(shape) != 1 or shape[0] < 2):
                raise StillroomError(
                    f"task {task.name!r} is classification but the {whose}'s head gives {shape} "
                    "per sample; a classification head gives (classes,) logits, classes >= 2"
                )
            if whose == "teacher" and shape != shapes[task.name]:
                raise StillroomError(
                    f"task {task.name!r}: the student's head gives {shapes[task.name]} per sample "
                    f"but the teacher's {shape}; give both heads the same number of outputs"
                )
            shapes[task.name] = shape


def distill_multitask(
    teacher: nn.Module | Teacher | None,
    student: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    tasks: list[TaskSpec],
    *,
    select: str | None = None,
    run_dir: Path | str | None = None,
    resume: bool = False,
    args: TrainArgs | None = None,
    **overrides: Any,
) -> DistillResult:
    """Train a multi-head `student` on every task at once, distilled from `teacher` per task.

    Args:
        teacher: a module (or a Teacher, e.g. `CachedTaskTeacher`) returning {task: outputs};
            None trains on labels alone (each task's hard label, weighted by its weight).
        student: a module returning {task: outputs}, e.g. `MultiTaskNet`.
        train_loader / val_loader: yield (inputs, {task: targets}, index); a missing label is
            IGNORE_INDEX (classification) or NaN (regression), e.g. `make_multitask_loader`.
        tasks: the tasks and how each is distilled (TaskSpec).
        select: the task whose validation metric picks the best checkpoint (default: the first).
        args / overrides: how to train (epochs, lr, ..., extra `terms`); alpha, temperature and
            loss come per task from `tasks`.

    Returns the loop's DistillResult; its history holds val/<task>/<metric> and train/<task>/<term>.
    """
    check_tasks(tasks)
    names = [t.name for t in tasks]
    if select is not None and select not in names:
        raise StillroomError(f"select {select!r} is not a task; tasks: {', '.join(names)}")
    check_outputs(student, teacher, tasks, next(iter(train_loader)))
    args = replace(args or TrainArgs(), **overrides) if overrides else (args or TrainArgs())
    terms = multitask_terms(tasks, with_teacher=teacher is not None)
    args = replace(
        args,
        alpha=None,  # every term is explicit: no classic alpha blend on top
        terms=(*terms, *(args.terms if teacher is not None else ())),
        outputs={t.name: t.kind for t in tasks},
        select=select or names[0],
    )
    return distill(
        teacher, student, train_loader, val_loader, run_dir=run_dir, resume=resume, args=args
    )


class CachedTaskTeacher:
    """Teacher outputs per task, computed once for every sample, looked up by sample index."""

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        self.tasks = {task: CachedTeacher(values) for task, values in outputs.items()}

    def to(self, device: torch.device | str) -> CachedTaskTeacher:
        for cached in self.tasks.values():
            cached.to(device)
        return self

    def __call__(self, inputs: torch.Tensor, index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {task: cached(inputs, index) for task, cached in self.tasks.items()}

    def save(self, path: Path) -> None:
        atomic_save_tensors({task: c.outputs for task, c in self.tasks.items()}, path)


@torch.no_grad()
def multitask_soft_targets(
    teacher: nn.Module, loader: DataLoader, tasks: list[str]
) -> CachedTaskTeacher:
    """Run the frozen teacher once over an unshuffled (inputs, targets, index) loader."""
    frozen = FrozenTeacher(teacher)
    device = next(teacher.parameters()).device
    rows: dict[str, list[torch.Tensor]] = {task: [] for task in tasks}
    seen = []
    for inputs, _, index in loader:
        outputs = frozen(inputs.to(device))
        for task in tasks:
            rows[task].append(outputs[task].float().cpu())
        seen.append(index)
    order = torch.cat(seen)
    assert torch.equal(order, torch.arange(len(loader.dataset))), "loader must be unshuffled"
    return CachedTaskTeacher({task: torch.cat(chunks) for task, chunks in rows.items()})
