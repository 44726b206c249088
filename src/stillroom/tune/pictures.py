"""The study's pictures: the history of trials, the parameters' importances, a T x alpha map.

Drawn with matplotlib from the study's trials into RUN_DIR/figures/, which the run's report
shows (stillroom.report.summary_report embeds a run's figures/*.png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

DPI = 110


def write_study_figures(
    study: Any, folder: Path, space: dict[str, dict[str, Any]], kinds: dict[str, str], metric: str
) -> list[Path]:
    """history.png, importances.png (two or more searched fields) and a map of the two first
    numeric fields (temperature x alpha when both are searched); returns the files written."""
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    maximize = study.direction.name == "MAXIMIZE"
    written = [_save(history(trials, metric, maximize), folder / "history.png")]
    importances = _importances(study) if len(space) > 1 and len(complete) > 1 else {}
    if importances:
        written.append(_save(importance_bars(importances), folder / "importances.png"))
    numeric = [n for n in space if kinds[n] != "choices"]
    pair = (
        ("distill.temperature", "distill.alpha")
        if {"distill.temperature", "distill.alpha"} <= set(numeric)
        else tuple(numeric[:2])
    )
    if len(pair) == 2 and complete:
        name = "temperature_alpha.png" if pair[0] == "distill.temperature" else "map.png"
        written.append(_save(value_map(complete, pair, space, metric), folder / name))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def history(trials: list[Any], metric: str, maximize: bool) -> plt.Figure:
    """Each finished trial's value (pruned ones at their last reported epoch), and the best so far."""
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    best, line = None, []
    for t in trials:
        if t.state == TrialState.COMPLETE:
            ax.scatter(t.number + 1, t.value, color="C0", zorder=3)
            better = best is None or (t.value > best if maximize else t.value < best)
            best = t.value if better else best
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            ax.scatter(t.number + 1, last, color="C7", marker="x", zorder=3)
        line.append(best)
    xs = [i + 1 for i, b in enumerate(line) if b is not None]
    ax.step(xs, [b for b in line if b is not None], where="post", color="C1", label="best so far")
    ax.scatter([], [], color="C0", label="complete")
    ax.scatter([], [], color="C7", marker="x", label="pruned (last epoch)")
    ax.set(xlabel="trial", ylabel=f"val {metric}", title="optimisation history")
    ax.legend(loc="lower right" if maximize else "upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _importances(study: Any) -> dict[str, float]:
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():  # a few trials: "importances will be equal" is expected
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # too few trials, or a space with a single value drawn
        return {}


def importance_bars(importances: dict[str, float]) -> plt.Figure:
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.4))
    ax.barh(names, [importances[n] for n in names], color="C2")
    ax.set(xlabel="importance (Optuna default evaluator)", title="parameter importances")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def value_map(
    complete: list[Any], pair: tuple[str, str], space: dict[str, dict[str, Any]], metric: str
) -> plt.Figure:
    """The completed trials on the plane of two fields, coloured by their value."""
    xs = [t.params[pair[0]] for t in complete]
    ys = [t.params[pair[1]] for t in complete]
    values = [t.value for t in complete]
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    points = ax.scatter(xs, ys, c=values, cmap="viridis", s=60, edgecolors="k")
    fig.colorbar(points, ax=ax, label=f"val {metric}")
    if space[pair[0]].get("log"):
        ax.set_xscale("log")
    if space[pair[1]].get("log"):
        ax.set_yscale("log")
    ax.set(xlabel=pair[0], ylabel=pair[1], title=f"{pair[0]} x {pair[1]}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
