"""`stillroom demo`: a CNN teacher distilled into a tiny MLP on scikit-learn's digits, two settings.

(a) all labels: the student sees every training label;
(b) few labels: the student sees 5% of the labels, and the teacher gives soft targets for every
    training input (an unlabelled transfer set) — the setting where distillation pays most.
The teacher is trained once, in (a), and reused in (b).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stillroom.config import Recipe, load_recipe
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.methods.classic import RunResult, run_recipe
from stillroom.results import Summary, markdown_table, read_summary
from stillroom.runs import hold, write_marker

FEW_LABEL_FRACTION = 0.05


@dataclass
class DemoResult:
    run_dir: Path
    settings: dict[str, RunResult]


def demo_recipes(seed: int = 0, overrides: list[str] | None = None) -> dict[str, Recipe]:
    """The two settings as recipes (built-in defaults plus the few-label override)."""
    base = [f"seed={seed}", *(overrides or [])]
    return {
        "all_labels": load_recipe(None, [*base, "name=digits_all_labels"]),
        "few_labels": load_recipe(
            None, [*base, "name=digits_few_labels", f"data.label_fraction={FEW_LABEL_FRACTION}"]
        ),
    }


def run_demo(
    run_dir: Path, seed: int = 0, progress: bool = True, overrides: list[str] | None = None
) -> DemoResult:
    """Both settings into `run_dir/all_labels` and `run_dir/few_labels`."""
    run_dir = Path(run_dir)
    recipes = demo_recipes(seed, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    hold(run_dir)
    write_marker(run_dir, "demo")
    atomic_write_json(
        run_dir / "demo.json",
        {"seed": seed, "overrides": overrides or [], "settings": list(recipes)},
    )
    results = {
        "all_labels": run_recipe(recipes["all_labels"], run_dir / "all_labels", progress=progress)
    }
    # (b) reuses the teacher trained in (a): the same big model, a student with far fewer labels
    few = recipes["few_labels"].model_copy(
        update={
            "teacher": recipes["few_labels"].teacher.model_copy(
                update={"checkpoint": run_dir / "all_labels" / "teacher"}
            )
        }
    )
    results["few_labels"] = run_recipe(few, run_dir / "few_labels", progress=progress)
    write_demo_md(run_dir)
    return DemoResult(run_dir, results)


def write_demo_md(run_dir: Path) -> None:
    """demo.md: both settings' tables (rewritten after the reports, whose latency they show)."""
    tables = [markdown_table(summary) for summary in demo_summaries(run_dir).values()]
    atomic_write_text(run_dir / "demo.md", "# stillroom demo\n\n" + "\n\n".join(tables) + "\n")


TITLES = {
    "all_labels": "(a) all labels: the student sees every training label",
    "few_labels": f"(b) few labels: the student sees {FEW_LABEL_FRACTION:.0%} of the labels, "
    "the teacher soft-labels every training input",
}


def demo_summaries(run_dir: Path) -> dict[str, Summary]:
    """Each setting's result contract, titled as the demo names it."""
    summaries = {}
    for name, title in TITLES.items():
        summary = read_summary(Path(run_dir) / name)
        summary.title = title
        summaries[name] = summary
    return summaries
