"""`method: continual`: a model kept current over a sequence of tasks, distilling from itself.

    class_incremental:  tasks of new classes (split digits: [0,1], [2,3], ..., [8,9])
    domain_incremental: the same classes under a new pixel permutation each task
    strategies on the same sequence and seed: finetune (lower bound), lwf, lwf_memory (LwF + a
    `memory`-sample exemplar memory), joint (upper bound); see stillroom.continual

Run folder (`stillroom distill recipes/digits_continual.yaml`):
    config.yaml
    <strategy>/task_T/   model.json + model.safetensors after task T, done.json (last: the
                         accuracy on every task seen so far, and the exemplar indices kept)
    matrix.json          accuracy[strategy][i][j]: on task j after task i; average, forgetting
    accuracy_matrix.png  average accuracy over tasks seen, after each task, per strategy
    summary.json, results.md   roles: baseline (finetune, joint), distilled (lwf, lwf_memory)

--resume continues each strategy at the first task without done.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from stillroom.config import DataSection, ModelSection, RecipeBase, check_student_trains
from stillroom.continual import (
    STRATEGIES,
    average_and_forgetting,
    check_class_tasks,
    permutation,
    permute,
    pick_memory,
    task_accuracy,
    train_task,
)
from stillroom.data import ArrayData, labelled_only, prepare_splits
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.measure import model_costs
from stillroom.models import build_model, load_model, save_model
from stillroom.results import ModelResult, Summary, describe, write_summary
from stillroom.runs import is_complete, mark_complete, prepare_run_dir

__all__ = ["ContinualRecipe", "ContinualSection", "run_continual"]


class ContinualSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scenario: Literal["class_incremental", "domain_incremental"] = "class_incremental"
    tasks: list[list[int]] | None = Field(
        None,
        max_length=1000,
        description="class_incremental: the classes of each task, every class in exactly one "
        "(default: consecutive pairs, [[0, 1], [2, 3], ...])",
    )
    num_tasks: int = Field(
        5, ge=1, le=1000, description="domain_incremental: how many permutations (task 0: none)"
    )
    strategies: list[Literal[STRATEGIES]] = Field(  # type: ignore[valid-type]
        list(STRATEGIES), min_length=1, description="what to run on the same sequence and seed"
    )
    memory: int = Field(
        200, ge=1, le=10_000_000, description="lwf_memory: exemplars kept over all earlier tasks"
    )
    epochs: int = Field(10, ge=1, le=100_000, description="epochs per task")
    lr: float = Field(1e-3, gt=0, le=10)
    batch_size: int = Field(32, ge=1)
    temperature: float = Field(2.0, gt=0, le=1000, allow_inf_nan=False)
    lwf_weight: float = Field(
        1.0, ge=0, le=1e6, allow_inf_nan=False, description="weight of the distillation term"
    )


class ContinualRecipe(RecipeBase):
    """Continual distillation (method: continual): LwF and LwF + memory over a task sequence."""

    method: Literal["continual"] = "continual"
    name: str = "digits_continual"
    data: DataSection = DataSection()
    continual: ContinualSection = ContinualSection()
    student: ModelSection = ModelSection(hidden=[128])
    absent: ClassVar[dict[str, str]] = {
        "teacher": "a continual recipe has no separate teacher: the model after each task is the "
        "teacher of the next; set student and continual",
    }

    def model_post_init(self, _: Any) -> None:
        check_student_trains(self.student)


def _tasks(recipe: ContinualRecipe, num_classes: int) -> list[list[int]]:
    section = recipe.continual
    if section.scenario == "domain_incremental":
        return [list(range(num_classes))] * section.num_tasks
    tasks = section.tasks or [
        list(range(c, min(c + 2, num_classes))) for c in range(0, num_classes, 2)
    ]
    check_class_tasks(tasks, num_classes)
    return tasks


def _task_split(
    recipe: ContinualRecipe, data: ArrayData, t: int, classes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t's (inputs, targets) of one split."""
    if recipe.continual.scenario == "domain_incremental":
        order = permutation(t, int(torch.tensor(data.input_shape).prod()), recipe.seed)
        return permute(data.inputs, order), data.targets
    keep = torch.isin(data.targets, torch.tensor(classes))
    return data.inputs[keep], data.targets[keep]


def run_continual(
    recipe: ContinualRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Summary:
    """Every strategy over the task sequence into `run_dir` (resumable by task)."""
    run_dir = Path(run_dir)
    splits = prepare_splits(recipe.data, recipe.seed)
    train, test = labelled_only(splits.train), splits.test
    if train.task != "classification" or train.mapped:
        raise StillroomError(
            f"method continual needs classification data in memory; '{recipe.data.source}' is "
            f"{train.task} data" + (" read from disk" if train.mapped else "")
        )
    tasks = _tasks(recipe, train.num_outputs)
    section = recipe.continual
    if "lwf_memory" in section.strategies and section.memory > len(train):
        raise StillroomError(
            f"continual.memory {section.memory} is larger than the {len(train)} training samples; "
            "keep fewer exemplars"
        )
    train_tasks = [_task_split(recipe, train, t, c) for t, c in enumerate(tasks)]
    test_tasks = [_task_split(recipe, test, t, c) for t, c in enumerate(tasks)]
    for t, (x, _) in enumerate(train_tasks):
        if len(x) == 0:
            raise StillroomError(f"continual.tasks[{t}] has no training samples in the data")
    prepare_run_dir(run_dir, recipe, resume, force, (recipe.data.path,))
    say = Console(stderr=True, highlight=False).print if progress else None

    matrices = {}
    for strategy in section.strategies:
        matrices[strategy] = _run_strategy(
            recipe, strategy, tasks, train_tasks, test_tasks, train, run_dir, resume, say
        )
    scores = {s: average_and_forgetting(m) for s, m in matrices.items()}
    atomic_write_json(
        run_dir / "matrix.json",
        {
            "tasks": tasks,
            "accuracy": matrices,
            "average": {s: a for s, (a, _) in scores.items()},
            "forgetting": {s: f for s, (_, f) in scores.items()},
        },
    )
    _plot(run_dir, matrices)
    summary = _summary(recipe, run_dir, tasks, scores, train.input_shape)
    write_summary(summary, run_dir)
    return summary


def _run_strategy(
    recipe, strategy, tasks, train_tasks, test_tasks, train, run_dir, resume, say
) -> list[list[float]]:
    section = recipe.continual
    spec = recipe.student.spec()
    torch.manual_seed(recipe.seed)  # every strategy starts from the same weights
    model = build_model(spec, train.input_shape, train.num_outputs)
    old = None
    memory: tuple[torch.Tensor, torch.Tensor] | None = None
    matrix: list[list[float]] = []
    for t, classes in enumerate(tasks):
        folder = run_dir / strategy / f"task_{t}"
        seen = torch.tensor(sorted({c for task in tasks[: t + 1] for c in task}))
        old_classes = torch.tensor(sorted({c for task in tasks[:t] for c in task}))
        x, y = train_tasks[t]
        if strategy == "joint":
            x = torch.cat([train_tasks[i][0] for i in range(t + 1)])
            y = torch.cat([train_tasks[i][1] for i in range(t + 1)])
        elif strategy == "lwf_memory" and memory is not None:
            x, y = torch.cat([x, memory[0]]), torch.cat([y, memory[1]])
        if resume and is_complete(folder):
            model = load_model(folder)[0]
            matrix.append(json.loads((folder / "done.json").read_text())["accuracy"])
        else:
            train_task(
                model,
                old,
                x,
                y,
                seen=seen,
                old_classes=old_classes,
                distill=strategy in ("lwf", "lwf_memory"),
                epochs=section.epochs,
                lr=section.lr,
                batch_size=section.batch_size,
                temperature=section.temperature,
                lwf_weight=section.lwf_weight,
                seed=recipe.seed * 1009 + t,
                # LwF has no old samples: the labels train the new classes' head only, the old
                # classes are held by distillation (pushing them down would undo it)
                ce_classes=torch.tensor(classes) if strategy == "lwf" else None,
            )
            row = [task_accuracy(model, *test_tasks[j], seen) for j in range(t + 1)]
            save_model(
                model,
                spec,
                folder,
                input_shape=list(train.input_shape),
                num_outputs=train.num_outputs,
                preprocess=train.preprocess,
            )
            mark_complete(folder, {"accuracy": row, "classes_seen": seen.tolist()})
            matrix.append(row)
            if say is not None:
                mean = sum(row) / len(row)
                say(
                    f"{strategy} task {t + 1}/{len(tasks)}: mean accuracy over seen tasks {mean:.3f}"
                )
        old = load_model(folder)[0].eval()  # frozen copy: the teacher of the next task
        if strategy == "lwf_memory":
            # exemplars over every task so far, evenly per class, from the data of those tasks
            pool_x = torch.cat([train_tasks[i][0] for i in range(t + 1)])
            pool_y = torch.cat([train_tasks[i][1] for i in range(t + 1)])
            if recipe.continual.scenario == "domain_incremental":
                pool_y_classes = list(range(train.num_outputs))
            else:
                pool_y_classes = seen.tolist()
            index = pick_memory(pool_y, pool_y_classes, section.memory, recipe.seed + t)
            memory = (pool_x[index], pool_y[index])
    return matrix


def _summary(recipe, run_dir, tasks, scores, input_shape) -> Summary:
    rows = []
    last = f"task_{len(tasks) - 1}"
    for strategy, (average, forgetting) in scores.items():
        folder = run_dir / strategy / last
        model, meta = load_model(folder)
        costs = model_costs(model, folder / "model.safetensors", input_shape)
        rows.append(
            ModelResult(
                name=strategy,
                role="distilled" if strategy.startswith("lwf") else "baseline",
                metrics={"average_accuracy": average, "forgetting": forgetting},
                folder=str(folder.relative_to(run_dir)),
                parameters=int(costs["parameters"]),
                size_bytes=int(costs["size_bytes"]),
                latency_ms=costs["latency_ms"],
                architecture=describe(meta["spec"]),
                teacher="itself after the previous task" if strategy.startswith("lwf") else "",
            )
        )
    section = recipe.continual
    primary = next((r.name for r in rows if r.name == "lwf_memory"), rows[0].name)
    return Summary(
        method="continual",
        title=f"continual distillation: {section.scenario}, {len(tasks)} tasks",
        task="classification",
        metric="average_accuracy",
        higher_is_better=True,
        models=rows,
        settings={
            "data": recipe.data.source,
            "scenario": section.scenario,
            "tasks": tasks if section.scenario == "class_incremental" else len(tasks),
            "memory": section.memory,
            "epochs_per_task": section.epochs,
            "seed": recipe.seed,
        },
        notes=[
            "average_accuracy: mean accuracy over every task after the last one; forgetting: "
            "mean over earlier tasks of (best accuracy ever - final accuracy); matrix.json has "
            "every task after every task"
        ],
        primary=primary,
    )


def _plot(run_dir: Path, matrices: dict[str, list[list[float]]]) -> None:
    from stillroom.plots import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, matrix in matrices.items():
        means = [sum(row) / len(row) for row in matrix]
        ax.plot(range(1, len(means) + 1), means, marker="o", label=strategy)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("mean test accuracy over tasks seen")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_matrix.png", dpi=100)
    plt.close(fig)
