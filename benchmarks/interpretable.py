"""Interpretable students on digits and the breast-cancer table: distilled vs fitted to labels.

    python examples/make_data.py                 # writes examples/data/breast_cancer.csv
    OMP_NUM_THREADS=1 python benchmarks/interpretable.py             # 3 seeds, both recipes
    python benchmarks/interpretable.py --datasets digits --seeds 5 students.generated=50000

Per seed and dataset one run of the recipe (recipes/digits_interpretable.yaml: CNN teacher, tree
and sparse linear students; recipes/breast_cancer_interpretable.yaml: MLP teacher, tree, rule
list and sparse linear students), every student at max_depth 8 (the recipes'), each fitted to the
labels alone and to the teacher over the training inputs plus 20,000 samples generated near them.
The seed changes the split, the teacher and the generated samples. Reported on the test split:
accuracy (labels vs distilled, and the difference in points), fidelity (top-1 agreement with the
teacher), size. Goal (issue 16): the distilled depth-8 tree beats the label tree by >= 2 points on
both datasets, with fidelity >= 0.9. Writes benchmarks/results/interpretable.md|json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, mean_std
from stillroom.methods import load_method_recipe
from stillroom.methods.interpretable import run_interpretable

ROOT = Path(__file__).parent.parent
RECIPES = {
    "digits": ROOT / "recipes" / "digits_interpretable.yaml",
    "breast_cancer": ROOT / "recipes" / "breast_cancer_interpretable.yaml",
}
OUT = ROOT / "benchmarks" / "results"
GOAL = "distilled tree beats the same-depth label tree by >= 2 points, fidelity >= 0.9 (depth 8)"


def run_one(dataset: str, seed: int, overrides: list[str], folder: Path) -> dict[str, Any]:
    _, recipe = load_method_recipe(RECIPES[dataset], [f"seed={seed}", *overrides])
    start = time.perf_counter()
    run_interpretable(recipe, folder, progress=False)  # type: ignore[arg-type]
    results = json.loads((folder / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - start
    return results


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per student: mean +- std of accuracy and fidelity both ways, and the gain in points."""
    models = per_seed[0]["models"]
    kinds = sorted({row["kind"] for name, row in models.items() if name != "teacher"})
    out: dict[str, Any] = {
        "teacher_accuracy": [r["models"]["teacher"]["accuracy"] for r in per_seed],
    }
    for kind in kinds:
        entry: dict[str, Any] = {}
        for way in ("labels", "distilled"):
            rows = [r["models"][f"{kind}_{way}"] for r in per_seed]
            entry[way] = {
                key: [row[key] for row in rows]
                for key in ("accuracy", "fidelity", "depth", "leaves", "rules", "nonzeros")
            }
        entry["gain_points"] = [
            100 * (d - lab)
            for d, lab in zip(
                entry["distilled"]["accuracy"], entry["labels"]["accuracy"], strict=True
            )
        ]
        out[kind] = entry
    return out


SIZE = {"tree": "leaves", "rule_list": "rules", "sparse_linear": "nonzeros"}


def size_text(kind: str, values: dict[str, list[Any]]) -> str:
    return f"{statistics.mean(values[SIZE[kind]]):.0f} {SIZE[kind]}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Interpretable students: distilled from a network vs fitted to labels",
        "",
        f"`{results['command']}`; {results['seeds']} seeds; test split; mean +- std.",
        f"Machine: {results['machine']}. Wall times measured under contention (2 shared cores).",
        f"Goal (issue 16): {GOAL}.",
        "",
        "| dataset | student | teacher acc | labels acc | distilled acc | gain (points) "
        "| labels fidelity | distilled fidelity | size (labels / distilled) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for dataset, summary in results["datasets"].items():
        for kind, entry in summary.items():
            if kind == "teacher_accuracy":
                continue
            gain = entry["gain_points"]
            lines.append(
                f"| {dataset} | {kind} | {mean_std(summary['teacher_accuracy'])} "
                f"| {mean_std(entry['labels']['accuracy'])} "
                f"| {mean_std(entry['distilled']['accuracy'])} "
                f"| {statistics.mean(gain):+.2f} +- {statistics.stdev(gain) if len(gain) > 1 else 0:.2f} "
                f"| {mean_std(entry['labels']['fidelity'])} "
                f"| {mean_std(entry['distilled']['fidelity'])} "
                f"| {size_text(kind, entry['labels'])} / {size_text(kind, entry['distilled'])} |"
            )
        tree = summary.get("tree")
        if tree is not None:
            gain = statistics.mean(tree["gain_points"])
            fidelity = statistics.mean(tree["distilled"]["fidelity"])
            met = gain >= 2 and fidelity >= 0.9
            verdicts.append(
                f"- {dataset}: tree gain {gain:+.2f} points, distilled fidelity {fidelity:.4f}: "
                f"goal {'met' if met else 'not met'}"
            )
    lines += ["", "Goal, per dataset (mean over seeds):", "", *verdicts, ""]
    lines.append(
        "Wall time per run (teacher training included): "
        + ", ".join(f"{d} {mean_std(w)} s" for d, w in results["wall_s"].items())
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. students.generated=0")
    args = parser.parse_args()
    per_dataset: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            for seed in range(args.seeds):
                print(f"{dataset} seed {seed} ...", flush=True)
                folder = Path(tmp) / f"{dataset}_{seed}"
                per_dataset.setdefault(dataset, []).append(
                    run_one(dataset, seed, args.overrides, folder)
                )
    results = {
        "command": "python benchmarks/interpretable.py "
        + " ".join(
            [*(["--datasets", *args.datasets] if args.datasets != list(RECIPES) else [])]
            + ([f"--seeds {args.seeds}"] if args.seeds != 3 else [])
            + args.overrides
        ),
        "seeds": args.seeds,
        "machine": machine(),
        "goal": GOAL,
        "datasets": {d: summarise(runs) for d, runs in per_dataset.items()},
        "wall_s": {d: [r["wall_s"] for r in runs] for d, runs in per_dataset.items()},
        "per_seed": per_dataset,
    }
    results["command"] = results["command"].strip()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "interpretable.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "interpretable.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
