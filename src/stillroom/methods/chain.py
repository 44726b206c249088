"""`distill_chain`: a chain of generations over any `nn.Module`s, each the teacher of the next.

    gen-0 (a trained teacher) -> gen-1 -> gen-2 -> ... -> gen-N

Born-again networks (Furlanello et al. 2018, arXiv:1805.04770) keep the teacher's architecture:
a student distilled from it can end up more accurate than it, and a further generation may gain
again. Teacher-assistant chains (Mirzadeh et al. 2020, arXiv:1902.03393) shrink along the way:
when a large teacher and a small student are far apart, intermediate "assistants" bridge the gap.

Each generation is one call of the loop `stillroom.train.distill` with the previous generation,
frozen, as its teacher. With a run folder a generation is complete only once `gen-k/done.json`
exists (written atomically, after its weights): a chain that fails in generation k keeps 0..k-1 on
disk, and a resumed chain skips them, continues generation k from its checkpoints and goes on.
The recipe workflow around it (`method: born_again`) is `stillroom.methods.born_again`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stillroom.errors import StillroomError
from stillroom.models import load_weights, save_weights
from stillroom.objective import tapped_layers
from stillroom.runs import DONE, is_complete, mark_complete
from stillroom.teachers import CachedTeacher, generate_soft_targets
from stillroom.train import DistillResult, TrainArgs, distill, evaluate, predict


class GenerationFailed(StillroomError):
    """A stage of a chain failed; every earlier stage's folder is complete. `stage` names it."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


@contextmanager
def failing_stage(stage: str, run_dir: Path | None, kept: str) -> Iterator[None]:
    """Re-raise a failure inside `stage` naming it, what is kept, and how to go on."""
    where = f"{kept} complete in {run_dir}; " if run_dir is not None else ""
    hint = (
        f"{where}fix the cause and rerun with --resume (Python: resume=True) to continue from "
        f"{stage}; the settings of generations not complete yet may change"
    )
    try:
        yield
    except StillroomError as err:
        raise GenerationFailed(f"{stage} failed: {err} -- {hint}", stage) from err
    except Exception as err:  # a bug keeps its traceback, with the way to resume added
        err.add_note(f"{stage} failed -- {hint}")
        raise


def agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of samples on which two classifiers pick the same class; both (N, C)."""
    return (outputs.argmax(1) == reference.argmax(1)).float().mean().item()


def evaluate_on_test(
    model: nn.Module,
    test_loader: DataLoader,
    task: str,
    teacher_outputs: torch.Tensor | None = None,
    gen0_outputs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Test metric and loss; for classifiers also the top-1 agreement with the given outputs
    (N, C) of the model's teacher and of generation 0."""
    metrics = evaluate(model, test_loader, task)
    if task == "classification" and (teacher_outputs is not None or gen0_outputs is not None):
        outputs = predict(model, test_loader)[0]
        if teacher_outputs is not None:
            metrics["agreement_teacher"] = agreement(outputs, teacher_outputs)
        if gen0_outputs is not None:
            metrics["agreement_gen0"] = agreement(outputs, gen0_outputs)
    return metrics


def distill_chain(
    teacher: nn.Module,
    students: Sequence[nn.Module],
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    test_loader: DataLoader | None = None,
    run_dir: Path | str | None = None,
    resume: bool = False,
    args: TrainArgs | Sequence[TrainArgs] | None = None,
    cache_targets: bool = False,
    **overrides: Any,
) -> list[DistillResult]:
    """Distil generation k from generation k-1, for k = 1..N (`teacher` is generation 0).

    Args:
        teacher: generation 0, already trained; frozen, never updated.
        students: generations 1..N in order, trained in place; each is frozen (eval mode,
            requires_grad off) once it teaches the next. Equal architectures: born-again
            networks; shrinking ones: a teacher-assistant chain.
        train_loader / val_loader: as for `stillroom.distill`; every generation trains on them.
        test_loader: with run_dir, each `gen-k/done.json` records the test metrics and the top-1
            agreement with generation k-1 and with generation 0.
        run_dir: each generation writes the loop's files, then `model.safetensors`, then
            `done.json` into `run_dir/gen-k/`. None keeps everything in memory.
        resume: load complete generations into the given students instead of training them;
            continue a started one from its last checkpoint.
        args / overrides: one `TrainArgs` for every generation, or one per generation; and/or
            fields applied to each (alpha=0.9, epochs=10, ...).
        cache_targets: run each teacher once over `train_loader.dataset` (batches must carry the
            sample index) instead of at every step: the same targets, less compute. Feature terms
            (hint, attention transfer) read the teacher's layers and always run it live.

    Returns:
        one DistillResult per student. A failing generation raises `GenerationFailed` naming it.
    """
    if not students:
        raise StillroomError("a chain needs at least one student")
    if args is None or isinstance(args, TrainArgs):
        per_generation = [args or TrainArgs()] * len(students)
    else:
        per_generation = list(args)
    if len(per_generation) != len(students):
        raise StillroomError(
            f"{len(per_generation)} TrainArgs for {len(students)} students; give one, or one per student"
        )
    per_generation = [replace(a, **overrides) for a in per_generation]
    run_dir = Path(run_dir) if run_dir is not None else None
    gen0_outputs = predict(teacher, test_loader)[0] if test_loader is not None else None
    results: list[DistillResult] = []
    previous = teacher
    for k, (student, gen_args) in enumerate(zip(students, per_generation, strict=True), start=1):
        folder = run_dir / f"gen-{k}" if run_dir is not None else None
        if folder is not None and resume and is_complete(folder):
            results.append(_load_complete(student, folder))
            previous = student
            continue
        with failing_stage(f"generation {k}", run_dir, f"generations 0-{k - 1} are"):
            live = not cache_targets or bool(tapped_layers(list(gen_args.terms))[1])
            result = distill(
                previous if live else _soft_targets(previous, train_loader),
                student,
                train_loader,
                val_loader,
                run_dir=folder,
                resume=resume and folder is not None and (folder / "checkpoints").is_dir(),
                args=gen_args,
            )
        if folder is not None:
            save_weights(result.student, folder / "model.safetensors")
            record: dict[str, Any] = {
                "generation": k,
                "metric": result.metric,
                "best_epoch": result.best_epoch,
                "best_value": result.best_value,
                "stopped_early": result.stopped_early,
            }
            if test_loader is not None:
                record["test"] = evaluate_on_test(
                    result.student,
                    test_loader,
                    gen_args.task,
                    predict(previous, test_loader)[0],
                    gen0_outputs,
                )
            mark_complete(folder, record)
        results.append(result)
        previous = result.student
    return results


def _soft_targets(teacher: nn.Module, train_loader: DataLoader) -> CachedTeacher:
    """The teacher's outputs for every training sample, computed once (row = sample index)."""
    return generate_soft_targets(
        teacher,
        DataLoader(
            train_loader.dataset,
            batch_size=512,
            shuffle=False,
            collate_fn=train_loader.collate_fn,  # the dataset's own way of making a batch
        ),
    )


def _load_complete(student: nn.Module, folder: Path) -> DistillResult:
    """A complete generation read back: its weights into `student`, its record and history."""
    load_weights(student, folder / "model.safetensors")
    record = json.loads((folder / DONE).read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return DistillResult(
        student=student,
        history=[json.loads(line) for line in lines],
        metric=record["metric"],
        best_epoch=record["best_epoch"],
        best_value=record["best_value"],
        stopped_early=record["stopped_early"],
        run_dir=folder,
    )
