"""The search's picture: every candidate's validation metric against each cost, the Pareto front
of each panel drawn as a step line, the budget and the starting student marked.

Written to RUN_DIR/figures/pareto.png, which the run's report shows (summary_report embeds a
run's figures/*.png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillroom.tune.pictures import _save, plt
from stillroom.tune.search_costs import pareto_front
from stillroom.tune.search_space import COSTS


def write_search_figures(
    rows: list[dict[str, Any]],
    folder: Path,
    cost: str,
    limit: float,
    start_costs: dict[str, Any],
    metric: str,
    maximize: bool,
    chosen: dict[str, Any] | None = None,
) -> list[Path]:
    """pareto.png: one panel per cost of COSTS, the budget's first; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    order = [cost, *(c for c in COSTS if c != cost)]
    fig, axes = plt.subplots(1, len(order), figsize=(5.0 * len(order), 4.2), sharey=True)
    for ax, name in zip(axes, order, strict=True):
        key = COSTS[name].key
        xs = [r["costs"][key] for r in rows]
        ax.scatter(xs, [r["value"] for r in rows], color="C0", s=28, label="candidate", zorder=3)
        front = pareto_front(rows, key, maximize)
        ax.plot(
            [r["costs"][key] for r in front],
            [r["value"] for r in front],
            drawstyle="steps-post",
            marker="o",
            markersize=9,
            markerfacecolor="none",
            color="C1",
            label="Pareto front",
            zorder=2,
        )
        starts = [r for r in rows if r["starting_student"]]
        for r in starts:
            ax.scatter(r["costs"][key], r["value"], marker="*", s=160, color="C3", zorder=4)
        if chosen is not None:
            ax.scatter(
                chosen["costs"][key], chosen["value"], marker="D", s=60, color="C2", zorder=5
            )
        ax.axvline(start_costs[key], color="C3", ls=":", lw=1, label="starting student's cost")
        if name == cost:
            ax.axvline(limit, color="k", ls="--", lw=1, label=f"budget {limit:.4g}")
        if max(xs) > 20 * max(min(xs), 1e-12):
            ax.set_xscale("log")
        ax.set(xlabel=COSTS[name].label, title=f"val {metric} vs {name}")
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], marker="*", s=160, color="C3", label="starting student")
    axes[0].scatter([], [], marker="D", s=60, color="C2", label="chosen (inside the budget)")
    axes[0].set_ylabel(f"val {metric} (short schedule)")
    axes[0].legend(fontsize=7, loc="lower right" if maximize else "upper right")
    fig.tight_layout()
    return [_save(fig, folder / "pareto.png")]
