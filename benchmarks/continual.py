"""Continual distillation on split digits: fine-tuning, LwF, LwF + 200 exemplars, joint; 3 seeds.

    python benchmarks/continual.py                                  # class-incremental, 5 x 2 classes
    python benchmarks/continual.py --scenario domain_incremental    # 5 pixel permutations

Every run is recipes/digits_continual.yaml through run_continual, into a temporary folder.
Writes benchmarks/results/continual_<scenario>.md|json: average accuracy and forgetting after the
last task (mean +- std over seeds), and the seed-mean accuracy matrix of each strategy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import machine, mean_std
from stillroom.methods import load_method_recipe
from stillroom.methods.continual import run_continual

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "digits_continual.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenario", default="class_incremental")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny trainings: threads only contend on a shared machine
    scores: dict[str, dict[str, list[float]]] = {}
    matrices: dict[str, list] = {}
    seconds = []
    for seed in args.seeds:
        _, recipe = load_method_recipe(
            RECIPE, [f"seed={seed}", f"continual.scenario={args.scenario}"]
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = run_continual(recipe, Path(tmp) / "run", progress=False)
            seconds.append(time.perf_counter() - start)
            record = json.loads((Path(tmp) / "run" / "matrix.json").read_text())
        for row in summary.models:
            entry = scores.setdefault(row.name, {"average_accuracy": [], "forgetting": []})
            for key in entry:
                entry[key].append(row.metrics[key])
            matrices.setdefault(row.name, []).append(record["accuracy"][row.name])
    lines = [
        f"# Continual distillation on split digits ({args.scenario})",
        "",
        f"`python benchmarks/continual.py --scenario {args.scenario}`; recipe "
        "recipes/digits_continual.yaml (MLP 128, 10 epochs per task, memory 200), seeds "
        + ", ".join(map(str, args.seeds)),
        "",
        "| strategy | average accuracy after the last task | forgetting |",
        "|---|---|---|",
    ]
    for name, entry in scores.items():
        lines.append(
            f"| {name} | {mean_std(entry['average_accuracy'])} | {mean_std(entry['forgetting'])} |"
        )
    lines += ["", "seed-mean accuracy on task j (columns) after task i (rows):", ""]
    mean_matrices = {}
    for name, runs in matrices.items():
        mean = [
            [statistics.mean(run[i][j] for run in runs) for j in range(len(runs[0][i]))]
            for i in range(len(runs[0]))
        ]
        mean_matrices[name] = mean
        lines += (
            [f"{name}:", ""] + ["    " + " ".join(f"{v:.2f}" for v in row) for row in mean] + [""]
        )
    lines.append(
        f"machine: {machine()}; 2 cores shared with other jobs at the time (wall times are not "
        f"clean timings): {statistics.mean(seconds):.0f} s per seed for all four strategies"
    )
    out = ROOT / "benchmarks" / "results"
    (out / f"continual_{args.scenario}.md").write_text("\n".join(lines) + "\n")
    payload = {
        "scores": scores,
        "matrices": mean_matrices,
        "seconds": seconds,
        "machine": machine(),
    }
    (out / f"continual_{args.scenario}.json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
