"""The parts of continual distillation, in plain torch: task sequences, exemplar memory, and one
task's training under each strategy.

    task 1 -> task 2 -> ... : the model after each task is the teacher of the next
    finetune    the new task's labels only (the lower bound: it forgets)
    lwf         + distillation from the previous model on the new inputs (Learning without
                Forgetting, Li & Hoiem 2016, arXiv:1606.09282)
    lwf_memory  + a small exemplar memory of earlier tasks, replayed with its labels and with the
                distillation term (iCaRL-style, Rebuffi et al. 2017, arXiv:1611.07725; exemplars
                drawn at random per class rather than by herding)
    joint       every task seen so far pooled (the upper bound)

Class-incremental: one head over every class; after task t the prediction is the argmax over the
classes seen so far. Domain-incremental: the same classes each task under a new fixed pixel
permutation (permuted inputs, Goodfellow et al. 2013).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError

STRATEGIES = ("finetune", "lwf", "lwf_memory", "joint")


def check_class_tasks(tasks: Sequence[Sequence[int]], num_classes: int) -> None:
    """Every class in exactly one task: overlapping, missing or unknown classes are one line."""
    seen: dict[int, int] = {}
    for t, classes in enumerate(tasks):
        if not classes:
            raise StillroomError(f"continual.tasks[{t}] is empty; give every task its classes")
        for c in classes:
            if not 0 <= c < num_classes:
                raise StillroomError(
                    f"continual.tasks[{t}] names class {c}, but the data has classes "
                    f"0..{num_classes - 1}"
                )
            if c in seen:
                raise StillroomError(
                    f"continual.tasks: class {c} is in task {seen[c]} and task {t}; the tasks of a "
                    "class-incremental sequence must not overlap"
                )
            seen[c] = t
    missing = sorted(set(range(num_classes)) - set(seen))
    if missing:
        raise StillroomError(
            f"continual.tasks leave out class(es) {', '.join(map(str, missing))}; every class of "
            "the data must be in one task"
        )


def permutation(task: int, numel: int, seed: int) -> torch.Tensor:
    """Task `task`'s fixed pixel order (task 0: the identity)."""
    if task == 0:
        return torch.arange(numel)
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed * 7919 + task))


def permute(inputs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(N, *shape) inputs with their flattened features reordered, reshaped back."""
    return inputs.flatten(1)[:, order].view_as(inputs)


def pick_memory(
    targets: torch.Tensor, classes: Sequence[int], size: int, seed: int
) -> torch.Tensor:
    """Indices of `size` exemplars spread evenly over `classes` (at random within each)."""
    generator = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(size, len(classes))
    chosen = []
    for i, c in enumerate(classes):
        members = torch.nonzero(targets == c).flatten()
        take = per_class + (1 if i < extra else 0)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def lwf_loss(
    logits: torch.Tensor, old_logits: torch.Tensor, old_classes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T**2 * KL(softmax(old / T) || softmax(new / T)) over the classes the old model knew.

    logits, old_logits: (N, C); old_classes: (K,) class ids. (Li & Hoiem 2016, eq. 2, with the
    KL form of Hinton et al. 2015.)"""
    soft = F.softmax(old_logits[:, old_classes] / temperature, dim=1)
    log_p = F.log_softmax(logits[:, old_classes] / temperature, dim=1)
    return F.kl_div(log_p, soft, reduction="batchmean") * temperature**2


def masked(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, C) logits with every class outside `classes` at -inf (not predicted, no gradient)."""
    mask = torch.full_like(logits, float("-inf"))
    mask[:, classes] = 0.0
    return logits + mask


def train_task(
    model: nn.Module,
    old: nn.Module | None,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    seen: torch.Tensor,
    old_classes: torch.Tensor,
    distill: bool,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float,
    lwf_weight: float,
    seed: int,
    ce_classes: torch.Tensor | None = None,
) -> nn.Module:
    """One task (in place): cross-entropy over `ce_classes` (default: the classes seen so far;
    LwF without memory: the new task's own classes, its new head in Li & Hoiem's terms), plus (distill and an old
    model) lwf_weight * lwf_loss on every batch. inputs: (n, *shape); targets: (n,)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ce_classes = seen if ce_classes is None else ce_classes
    teacher_logits = None
    if distill and old is not None:
        with torch.no_grad():  # the previous model is frozen: its outputs are computed once
            teacher_logits = old.eval()(inputs)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(inputs), generator=generator).split(batch_size):
            logits = model(inputs[index])
            loss = F.cross_entropy(masked(logits, ce_classes), targets[index])
            if teacher_logits is not None:
                kd = lwf_loss(logits, teacher_logits[index], old_classes, temperature)
                loss = loss + lwf_weight * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def task_accuracy(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor
) -> float:
    """Accuracy with the prediction taken over the classes seen so far."""
    model.eval()
    predictions = masked(model(inputs), seen).argmax(1)
    return (predictions == targets).float().mean().item()


def average_and_forgetting(matrix: list[list[float]]) -> tuple[float, float]:
    """(mean of the last row, mean over earlier tasks of best-ever minus final accuracy).

    matrix[i][j]: accuracy on task j after training task i (j <= i)."""
    last = matrix[-1]
    average = sum(last) / len(last)
    earlier = range(len(last) - 1)
    drops = [max(row[j] for row in matrix[j:]) - last[j] for j in earlier]
    return average, (sum(drops) / len(drops) if drops else 0.0)
