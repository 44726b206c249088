"""What a ranking run measures: HR@k, NDCG@k and AUC of one held-out positive among sampled
negatives, full-catalogue recall@k, and the serving costs of each model (parameters, size,
latency to score 100 candidates for one user, throughput), then the summary table."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stillroom.data.interactions import Interactions
from stillroom.measure import weights_bytes
from stillroom.models import count_parameters
from stillroom.results import ModelResult, Summary, gap_note

K = 10
SERVE_CANDIDATES = 100
THROUGHPUT_BATCH = 256


@torch.no_grad()
def score_rows(model: nn.Module, rows: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    """(U, 1 + C) rows of user + candidates -> (U, C) scores, in chunks."""
    model.eval()
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    return torch.cat([model(rows_t[i : i + chunk]) for i in range(0, len(rows_t), chunk)])


def candidate_metrics(scores: torch.Tensor, k: int = K) -> dict[str, float]:
    """(U, 1 + N) scores, the held-out positive in column 0 -> hr@k, ndcg@k, auc (ties count
    half for AUC, against the positive for the rank)."""
    positive, negatives = scores[:, :1], scores[:, 1:]
    rank = (negatives >= positive).sum(1).float()  # 0 = ranked first
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank))
    auc = ((negatives < positive).float() + 0.5 * (negatives == positive).float()).mean(1)
    return {
        f"hr@{k}": hit.float().mean().item(),
        f"ndcg@{k}": ndcg.mean().item(),
        "auc": auc.mean().item(),
    }


@torch.no_grad()
def full_scores(model: nn.Module, n_users: int, n_items: int, chunk: int = 128) -> torch.Tensor:
    """(n_users, n_items) the model's score of every item for every user."""
    model.eval()
    items = torch.arange(n_items)
    out = []
    for start in range(0, n_users, chunk):
        users = torch.arange(start, min(start + chunk, n_users))
        out.append(model(torch.cat([users[:, None], items.expand(len(users), -1)], dim=1)))
    return torch.cat(out)


def _seen_in_training(data: Interactions, with_val: bool) -> torch.Tensor:
    mask = torch.zeros(data.n_users, data.n_items, dtype=torch.bool)
    mask[torch.as_tensor(data.train_users), torch.as_tensor(data.train_items)] = True
    if with_val:
        mask[torch.arange(data.n_users), torch.as_tensor(data.val_items)] = True
    return mask


def full_recall(scores: torch.Tensor, data: Interactions, k: int) -> float:
    """Recall@k over the whole catalogue from (n_users, n_items) scores: the share of users whose
    test item is among the k best scored items, training and validation items excluded (one
    held-out item: recall = hit rate)."""
    masked = scores.masked_fill(_seen_in_training(data, with_val=True), float("-inf"))
    top = masked.topk(min(k, data.n_items), dim=1).indices
    return (top == torch.as_tensor(data.test_items)[:, None]).any(1).float().mean().item()


def teacher_top(scores: torch.Tensor, data: Interactions, k: int) -> torch.Tensor:
    """(n_users, k) the teacher's best items per user among those not in the user's training
    items, best first (from its (n_users, n_items) scores): the lists ranking distillation reads."""
    masked = scores.masked_fill(_seen_in_training(data, with_val=False), float("-inf"))
    return masked.topk(k, dim=1).indices


def evaluate_ranker(
    model: nn.Module,
    data: Interactions,
    test_sets: dict[int, np.ndarray],
    recall_k: int,
    scores: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every test metric of one model: for each negative count N, hr/ndcg@10 and AUC (the first
    count unsuffixed, the others suffixed _N), then full-catalogue recall@k."""
    metrics: dict[str, float] = {}
    for i, (count, rows) in enumerate(test_sets.items()):
        found = candidate_metrics(score_rows(model, rows))
        suffix = "" if i == 0 else f"_{count}neg"
        metrics |= {f"{name}{suffix}": value for name, value in found.items()}
    if scores is None:
        scores = full_scores(model, data.n_users, data.n_items)
    metrics[f"recall@{recall_k}_full"] = full_recall(scores, data, recall_k)
    return metrics


@torch.inference_mode()
def serving_costs(
    model: nn.Module, n_users: int, n_items: int, repeats: int = 100
) -> dict[str, float]:
    """Median ms to score SERVE_CANDIDATES items for one user (batch 1), and users per second
    scored at THROUGHPUT_BATCH users x SERVE_CANDIDATES items (CPU, eager PyTorch)."""
    model = model.eval().cpu()
    g = torch.Generator().manual_seed(0)

    def rows(batch: int) -> torch.Tensor:
        users = torch.randint(0, n_users, (batch, 1), generator=g)
        return torch.cat(
            [users, torch.randint(0, n_items, (batch, SERVE_CANDIDATES), generator=g)], 1
        )

    one, many = rows(1), rows(THROUGHPUT_BATCH)
    for _ in range(min(10, repeats)):
        model(one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - start)
    model(many)
    batch_times = []
    for _ in range(max(3, repeats // 10)):
        start = time.perf_counter()
        model(many)
        batch_times.append(time.perf_counter() - start)
    return {
        "latency_ms": statistics.median(times) * 1000.0,
        "users_per_s": THROUGHPUT_BATCH / statistics.median(batch_times),
    }


def model_row(
    name: str,
    model: nn.Module,
    folder: Path | None,
    data: Interactions,
    metrics: dict[str, Any],
    repeats: int = 100,
) -> dict[str, Any]:
    costs = serving_costs(model, data.n_users, data.n_items, repeats)
    return {
        "metrics": {**metrics, "users_per_s": costs["users_per_s"]},
        "parameters": count_parameters(model),
        "size_bytes": weights_bytes(folder) if folder is not None else None,
        "latency_ms": costs["latency_ms"],
    }


def summarize(
    run_dir: Path,
    rows: dict[str, dict[str, Any]],
    roles: dict[str, str],
    architectures: dict[str, str],
    kd_teacher: str,
    primary: str | None,
    settings: dict[str, Any],
    notes: list[str],
) -> Summary:
    """The teacher (or ensemble and its members), the scratch student, then each distilled one."""
    metric = f"ndcg@{K}"
    models = [
        ModelResult(
            name=name,
            role=roles[name],  # type: ignore[arg-type]
            metrics=row["metrics"],
            folder=row.get("folder"),
            parameters=row["parameters"],
            size_bytes=row["size_bytes"],
            latency_ms=row["latency_ms"],
            architecture=architectures.get(name, ""),
            teacher=kd_teacher if roles[name] == "distilled" else "",
        )
        for name, row in rows.items()
    ]
    teacher = rows[kd_teacher]["metrics"][metric]
    scratch = rows.get("student_scratch", {}).get("metrics", {}).get(metric)
    lines = []
    for name, role in roles.items():
        if role != "distilled":
            continue
        value = rows[name]["metrics"][metric]
        _, gap = gap_note(teacher, scratch, value, metric, True)
        lines.append(f"{name}: {value / teacher:.1%} of the teacher's {metric}; {gap}")
    return Summary(
        method="ranking",
        title=f"ranking distillation: test {metric}, 1 positive vs sampled negatives "
        f"({run_dir.name})",
        task="ranking",
        metric=metric,
        higher_is_better=True,
        models=models,
        settings=settings,
        notes=[*notes, *lines],
        primary=primary,
    )
