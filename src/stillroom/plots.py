"""PNG figures of a run: learning curves, and the task metric against model size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from stillroom.methods.classic import RunResult

COLORS = {"teacher": "tab:gray", "student_scratch": "tab:orange", "student_kd": "tab:blue"}


def _records(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(result: RunResult) -> None:
    """Write curves.png (val metric and train loss terms per epoch) and size_vs_metric.png."""
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for role in result.rows:
        records = _records(result.run_dir / role)
        if not records:
            continue  # a teacher loaded from a checkpoint has no curves in this run
        epochs = [r["epoch"] for r in records]
        ax_metric.plot(
            epochs, [r.get(f"val/{result.metric}") for r in records], label=role, color=COLORS[role]
        )
        color = COLORS[role]
        if role == "student_kd":
            distillation = [r["train/distillation"] for r in records]
            ax_loss.plot(epochs, distillation, label="kd: distillation term", color=color)
            hard = [r["train/hard_label"] for r in records]
            ax_loss.plot(epochs, hard, label="kd: hard-label term", color=color, ls=":")
        elif role == "student_scratch":
            hard = [r["train/hard_label"] for r in records]
            ax_loss.plot(epochs, hard, label="scratch: hard-label", color=color, ls="--")
    ax_metric.set(xlabel="epoch", ylabel=f"validation {result.metric}", title="Learning curves")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss terms", yscale="log")
    ax_metric.legend()
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(result.run_dir / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for role, row in result.rows.items():
        ax.scatter(row["parameters"], row[result.metric], s=60, color=COLORS[role], label=role)
    ax.set(
        xscale="log",
        xlabel="parameters",
        ylabel=f"test {result.metric}",
        title=f"{result.metric} vs size",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(result.run_dir / "size_vs_metric.png", dpi=110)
    plt.close(fig)
