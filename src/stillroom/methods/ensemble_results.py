"""What an ensemble run reports: the ensemble, every member and the students on the test split
(metric, parameters, size on disk, CPU latency, agreement with the ensemble, member weight, gap
closed), as results.json, results.md and a table for the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stillroom.data import ArrayData, labelled_only, make_loader
from stillroom.io import atomic_write_json
from stillroom.measure import latency_ms, model_costs
from stillroom.models import count_parameters
from stillroom.results import ModelResult, Summary, gap_note, write_summary
from stillroom.teachers import EnsembleModule
from stillroom.train import evaluate, predict
from stillroom.train.evaluate import METRICS


@dataclass
class EnsembleResult:
    run_dir: Path
    task: str
    metric: str
    combine: str
    weights: list[float]
    rows: dict[str, dict[str, Any]]
    gap_closed: float | None
    """(kd - scratch) / (ensemble - scratch)."""


def evaluate_models(
    ensemble: EnsembleModule,
    members: list[torch.nn.Module],
    students: dict[str, torch.nn.Module],
    test: ArrayData,
    run_dir: Path,
    task: str,
) -> dict[str, dict[str, Any]]:
    """One row per model on the test split: the ensemble (its parameters, size and latency are
    those of all members together), each member (with its weight), then the students."""
    loader = make_loader(test, 512, shuffle=False)
    ensemble_pred = predict(ensemble, loader)[0].argmax(1) if task == "classification" else None
    rows: dict[str, dict[str, Any]] = {
        "ensemble": {
            **evaluate(ensemble, loader, task),
            "parameters": count_parameters(ensemble),
            "size_bytes": sum(
                (run_dir / f"teacher_{i}" / "model.safetensors").stat().st_size
                for i in range(len(members))
            ),
            "latency_ms": latency_ms(ensemble, test.input_shape),
            "members": len(members),
        }
    }
    models = {f"teacher_{i}": member for i, member in enumerate(members)} | students
    for role, model in models.items():
        row = {
            **evaluate(model, loader, task),
            **model_costs(model, run_dir / role / "model.safetensors", test.input_shape),
        }
        if role.startswith("teacher_"):
            row["weight"] = ensemble.weights[int(role.removeprefix("teacher_"))].item()
        if ensemble_pred is not None:
            agree = predict(model, loader)[0].argmax(1) == ensemble_pred
            row["ensemble_agreement"] = agree.float().mean().item()
        rows[role] = row
    return rows


def write_results(result: EnsembleResult, student_train: ArrayData, test_samples: int) -> None:
    """results.json (every number) and results.md (the table), each written atomically."""
    payload = {
        "method": "ensemble",
        "task": result.task,
        "metric": result.metric,
        "combine": result.combine,
        "weights": result.weights,
        "gap_closed": result.gap_closed,
        "train_samples": len(student_train),
        "labelled_train_samples": len(labelled_only(student_train)),
        "test_samples": test_samples,
        "models": result.rows,
    }
    atomic_write_json(result.run_dir / "results.json", payload)
    write_summary(summarize(result), result.run_dir)


def summarize(result: EnsembleResult) -> Summary:
    """The ensemble (the students' teacher), each member, then the two students."""
    higher = METRICS[result.task][1] == "max"
    roles = {"ensemble": "ensemble", "student_scratch": "baseline", "student_kd": "distilled"}
    models = [
        ModelResult(
            name=name,
            role=roles.get(name, "member"),  # type: ignore[arg-type]
            metrics={
                result.metric: row[result.metric],
                "ensemble_agreement": row.get("ensemble_agreement"),
                "member_weight": row.get("weight"),
            },
            folder=None if name == "ensemble" else name,
            parameters=row["parameters"],
            size_bytes=row["size_bytes"],
            latency_ms=row["latency_ms"],
            teacher="ensemble" if name == "student_kd" else "",
        )
        for name, row in result.rows.items()
    ]
    value = {name: row[result.metric] for name, row in result.rows.items()}
    _, gap_line = gap_note(
        value["ensemble"],
        value.get("student_scratch"),
        value.get("student_kd"),
        result.metric,
        higher,
    )
    return Summary(
        method="ensemble",
        title=f"ensemble distillation: test {result.metric} ({result.run_dir.name})",
        task=result.task,
        metric=result.metric,
        higher_is_better=higher,
        models=models,
        settings={"combine": result.combine, "weights": [round(w, 4) for w in result.weights]},
        notes=[
            f"ensemble: {result.combine} of {len(result.weights)} members; the ensemble plays "
            "the teacher",
            gap_line,
        ],
        primary="student_kd",
    )
