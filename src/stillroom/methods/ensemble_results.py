"""What an ensemble run reports: the ensemble, every member and the students on the test split
(metric, parameters, size on disk, CPU latency, agreement with the ensemble, member weight, gap
closed), as results.json, results.md and a table for the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.table import Table

from stillroom.data import ArrayData, labelled_only, make_loader
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.measure import format_bytes, latency_ms, model_costs
from stillroom.models import count_parameters
from stillroom.teachers import EnsembleModule
from stillroom.train import evaluate, predict


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
    atomic_write_text(result.run_dir / "results.md", results_markdown(result) + "\n")


def _cells(result: EnsembleResult, role: str, row: dict[str, Any]) -> list[str]:
    """model, metric, parameters, size, latency, agreement with the ensemble, member weight."""
    ensemble = result.rows["ensemble"]
    small = (
        ""
        if role == "ensemble"
        else f" ({ensemble['parameters'] / row['parameters']:.0f}x smaller)"
    )
    fast = (
        "" if role == "ensemble" else f" ({ensemble['latency_ms'] / row['latency_ms']:.1f}x faster)"
    )
    return [
        role,
        f"{row[result.metric]:.4f}",
        f"{row['parameters']:,}{small}",
        format_bytes(row["size_bytes"]),
        f"{row['latency_ms']:.3f} ms{fast}",
        f"{row['ensemble_agreement']:.3f}" if "ensemble_agreement" in row else "-",
        f"{row['weight']:.3f}" if "weight" in row else "-",
    ]


def _gap_line(result: EnsembleResult) -> str:
    gap = "n/a" if result.gap_closed is None else f"{result.gap_closed:.2f}"
    return f"gap closed = (kd - scratch) / (ensemble - scratch) = {gap}"


def results_markdown(result: EnsembleResult) -> str:
    """The ensemble, each member and the students as one Markdown table, and the gap closed."""
    lines = [
        f"| model | test {result.metric} | parameters | size on disk | CPU latency (batch 1) | "
        "agreement with ensemble | member weight |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_cells(result, r, row)) + " |" for r, row in result.rows.items()]
    lines += ["", f"ensemble: {result.combine} of {len(result.weights)} members", _gap_line(result)]
    return "\n".join(lines)


def show(result: EnsembleResult, title: str) -> Table:
    """The results table for the terminal."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    for column in (result.metric, "params", "size", "latency", "agree", "weight"):
        table.add_column(column, justify="right", no_wrap=True)
    for role, row in result.rows.items():
        table.add_row(*(c.split(" (")[0] for c in _cells(result, role, row)))
    agree = "; agree: top-1 agreement with the ensemble" if result.task == "classification" else ""
    table.caption = (
        f"test split; ensemble: {result.combine}; latency: CPU, batch 1, median{agree}\n"
        f"{_gap_line(result)}"
    )
    return table
