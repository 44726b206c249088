"""The report's figures, drawn from report.json's numbers alone (so they can be redrawn later)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

LABELS = {
    "teacher": "teacher",
    "student_scratch": "student, labels only",
    "student_kd": "student, distilled",
    "onnx_fp32": "distilled, ONNX fp32",
    "onnx_int8": "distilled, ONNX int8",
}
COLORS = {
    "teacher": "tab:gray",
    "student_scratch": "tab:orange",
    "student_kd": "tab:blue",
    "onnx_fp32": "tab:green",
    "onnx_int8": "tab:purple",
}
DPI = 100


FIGURES = ("tradeoff", "costs", "curves", "reliability", "per_class")
"""Every figure a report may hold, in the order it shows them."""


def write_figures(numbers: dict[str, Any], out: Path) -> dict[str, Path]:
    """Draw every figure into `out`; {name: png path}, in the order the report shows them."""
    drawers = {"tradeoff": tradeoff, "costs": costs, "curves": curves}
    if numbers["task"] == "classification":
        drawers |= {"reliability": reliability_diagram, "per_class": per_class}
    for name in set(FIGURES) - set(drawers):
        # an earlier report in this folder may have had it: a stale figure must not linger
        (out / f"{name}.png").unlink(missing_ok=True)
    paths = {}
    for name, draw in drawers.items():
        fig = draw(numbers)
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=DPI)
        plt.close(fig)
    return paths


def _all_models(numbers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**numbers["models"], **numbers["exports"]}


def _large(numbers: dict[str, Any]) -> int:
    return numbers["measurement"]["timing"]["large_batch"]


def tradeoff(numbers: dict[str, Any]) -> plt.Figure:
    """Test metric against p50 latency (whisker to p95), at batch 1 and at the large batch."""
    metric, large = numbers["metric"], _large(numbers)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, batch in zip(axes, (1, large), strict=True):
        for name, row in _all_models(numbers).items():
            lat = row[f"latency_batch_{batch}"]
            ax.errorbar(
                lat["p50_ms"],
                row[metric],
                xerr=[[0.0], [lat["p95_ms"] - lat["p50_ms"]]],
                fmt="o",
                ms=8,
                capsize=3,
                color=COLORS[name],
                label=LABELS[name],
            )
        better = "higher" if numbers["higher_is_better"] else "lower"
        ax.set(
            xscale="log",
            xlabel=f"CPU latency, batch {batch} (ms, p50; whisker to p95)",
            ylabel=f"test {metric} ({better} is better)",
            title=f"{metric} vs latency, batch {batch}",
        )
        # plain numbers at 1, 2 and 5 per decade: the default labels every minor tick when the
        # range spans less than a decade, and they overlap
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def costs(numbers: dict[str, Any]) -> plt.Figure:
    """Parameters, size on disk, peak memory and batch-1 latency of every model, as bars."""
    large = _large(numbers)
    panels = (
        ("parameters", lambda r: r.get("parameters"), "count"),
        ("size on disk", lambda r: r.get("size_bytes", 0) / 1024, "KiB"),
        (
            f"peak memory, batch {large}",
            lambda r: r["peak_memory_bytes"] / 1024 if "peak_memory_bytes" in r else None,
            "KiB",
        ),
        ("latency, batch 1", lambda r: r["latency_batch_1"]["p50_ms"], "ms (p50)"),
    )
    models = _all_models(numbers)
    names = list(models)
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 0.5 * len(names) + 1.8))
    for ax, (title, value, unit) in zip(axes, panels, strict=True):
        values = [value(models[n]) for n in names]
        y = np.arange(len(names))
        shown = [v if v is not None else 0.0 for v in values]
        ax.barh(y, shown, color=[COLORS[n] for n in names])
        for i, v in enumerate(values):
            text = "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
            ax.text(v or 0.0, i, f" {text}", va="center", fontsize=8)
        ax.set_yticks(y, [LABELS[n] for n in names] if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set(title=title, xlabel=unit)
        positive = [v for v in values if v]
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.35)
    fig.tight_layout()
    return fig


def curves(numbers: dict[str, Any]) -> plt.Figure:
    """One panel per train/* and val/* series found in any phase's metrics.jsonl."""
    series = numbers["curves"]
    keys = sorted(
        {k for role in series.values() for k in role if k != "epoch"},
        key=lambda k: (not k.startswith("train/"), k),
    )
    if not keys:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no training logs (metrics.jsonl) in this run", ha="center")
        ax.set_axis_off()
        return fig
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for index, (role, log) in enumerate(series.items()):
            # a model without the term logs zeros for it: no line, rather than a flat one at 0
            if key not in log or all(v in (None, 0) for v in log[key]):
                continue
            values = [np.nan if v is None else v for v in log[key]]
            color = COLORS.get(role, f"C{index % 10}")
            ax.plot(log["epoch"], values, marker=".", color=color, label=LABELS.get(role, role))
        ax.set(title=key, xlabel="epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_axis_off()
    drawn = [ax for ax in axes.flat if ax.lines]
    if drawn:
        drawn[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def reliability_diagram(numbers: dict[str, Any]) -> plt.Figure:
    """Per model: accuracy within each confidence bin against the diagonal of perfect calibration."""
    models = numbers["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for ax, (role, row) in zip(axes.flat, models.items(), strict=True):
        bins = [b for b in row["reliability"] if b["count"]]  # empty bins have no accuracy
        width = row["reliability"][0]["upper"] - row["reliability"][0]["lower"]
        centres = [b["lower"] + width / 2 for b in bins]
        accuracy = [b["accuracy"] for b in bins]
        confidence = [b["confidence"] for b in bins]
        ax.bar(
            centres, accuracy, width=width * 0.95, color=COLORS[role], alpha=0.8, label="accuracy"
        )
        ax.bar(
            centres,
            [c - a for a, c in zip(accuracy, confidence, strict=True)],
            bottom=accuracy,
            width=width * 0.95,
            fill=False,
            edgecolor="tab:red",
            lw=1.2,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1, label="perfect calibration")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence (top-1 softmax)",
            ylabel="accuracy",
            title=f"{LABELS[role]}\nECE {row['ece']:.3f}",
        )
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def per_class(numbers: dict[str, Any]) -> plt.Figure:
    """Grouped bars: test accuracy of each model within each class."""
    models = numbers["models"]
    classes = numbers["num_outputs"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * classes + 3.5), 4))
    width = 0.8 / len(models)
    lowest = 1.0
    for i, (role, row) in enumerate(models.items()):
        values = [np.nan if v is None else v for v in row["per_class_accuracy"]]
        lowest = min(lowest, np.nanmin(values))
        x = np.arange(classes) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, values, width=width, color=COLORS[role], label=LABELS[role])
    ax.set_xticks(np.arange(classes), [str(c) for c in range(classes)])
    ax.set(xlabel="class", ylabel="test accuracy", title="accuracy per class")
    ax.set_ylim(max(0.0, lowest - 0.1), 1.0)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
