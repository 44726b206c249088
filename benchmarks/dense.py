"""Dense distillation on digit scenes: segmentation (mIoU) and CenterNet-style detection (mAP@0.5).

    python benchmarks/dense.py                  # 3 seeds, both recipes
    python benchmarks/dense.py --tasks detection --seeds 5 distill.epochs=20

Per seed and task one run of the recipe (recipes/scenes_segmentation.yaml,
recipes/scenes_detection.yaml): the fcn teacher trained on the labels, the 15x smaller fcn student
from labels alone (scratch) and one student per distillation variant (segmentation: pixel-wise
soft targets, channel-wise distillation, FitNets features on a decoder layer; detection: heatmap +
box terms, CWD on the heatmaps, features), each beside the labels' term, identically initialised.
Test scenes use digits the training scenes never show. Gap closed = (kd - scratch) / (teacher -
scratch) per seed, then mean +- std. Writes benchmarks/results/dense.md|json.
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
from stillroom.methods.dense import run_dense

ROOT = Path(__file__).parent.parent
RECIPES = {
    "segmentation": ROOT / "recipes" / "scenes_segmentation.yaml",
    "detection": ROOT / "recipes" / "scenes_detection.yaml",
}
OUT = ROOT / "benchmarks" / "results"
PAPERS = {
    "segmentation": "CWD (Shu et al. 2021) closes 14% on Cityscapes (PSPNet R101 -> R18)",
    "detection": "FGD (Yang et al. 2022) closes 86% on COCO",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    start = time.time()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            runs[task] = []
            for seed in range(args.seeds):
                began = time.time()
                _, recipe = load_method_recipe(RECIPES[task], [f"seed={seed}", *args.overrides])
                summary = run_dense(recipe, Path(tmp) / f"{task}{seed}", progress=False)
                runs[task].append(
                    {
                        "seed": seed,
                        "wall_s": round(time.time() - began, 1),
                        "primary": summary.primary,
                        "models": {
                            m.name: {
                                "role": m.role,
                                "metrics": m.metrics,
                                "parameters": m.parameters,
                                "latency_ms": m.latency_ms,
                            }
                            for m in summary.models
                        },
                    }
                )
                print(f"{task} seed {seed} done at {time.time() - start:.0f} s", flush=True)
    write(runs, time.time() - start, args.overrides)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(task: str, per_seed: list[dict[str, Any]]) -> list[str]:
    models = per_seed[0]["models"]
    metric, other = list(models["teacher"]["metrics"])[:2]
    lines = [
        f"## {task} ({len(per_seed)} seeds; headline {metric})",
        "",
        f"| model | {metric} | {other} | gap closed | paired diff vs scratch | parameters | "
        "ms (batch 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    scratch = [s["models"]["student_scratch"]["metrics"][metric] for s in per_seed]
    verdicts = []
    for name, first in models.items():
        rows = [s["models"][name] for s in per_seed]
        values = [r["metrics"][metric] for r in rows]
        gaps = [r["metrics"]["gap_closed"] for r in rows]
        gap = mean_std(gaps) if all(g is not None for g in gaps) else "-"
        diff = "-"
        if first["role"] == "distilled":
            d = [v - b for v, b in zip(values, scratch, strict=True)]
            diff = f"{statistics.mean(d):+.4f} +- {_std(d):.4f}"
            helps = statistics.mean(d) > _std(d)
            verdicts.append(f"- {name}: {'beats' if helps else 'does not beat'} the scratch "
                            f"student by more than the spread of the paired differences")  # fmt: skip
        latency = sorted(r["latency_ms"] for r in rows)[len(rows) // 2]
        lines.append(
            f"| {name} ({first['role']}) | {mean_std(values)} | "
            f"{mean_std([r['metrics'][other] for r in rows])} | {gap} | {diff} | "
            f"{first['parameters']:,} | {latency:.2f} |"
        )
    return [*lines, "", *verdicts, "", f"Paper figure to compare with: {PAPERS[task]}.", ""]


def write(runs: dict[str, list[dict[str, Any]]], wall: float, overrides: list[str]) -> None:
    lines = [
        "# Dense distillation on digit scenes",
        "",
        f"`python benchmarks/dense.py{' ' + ' '.join(overrides) if overrides else ''}` "
        f"(recipes/scenes_segmentation.yaml, recipes/scenes_detection.yaml); machine: "
        f"{machine()}, shared with other jobs at the time (wall times measured under "
        f"contention are not clean timings); whole benchmark {wall / 60:.1f} min wall.",
        "",
    ]
    for task, per_seed in runs.items():
        lines += table(task, per_seed)
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(runs) == set(RECIPES) else "_" + "_".join(runs)
    (OUT / f"dense{suffix}.md").write_text("\n".join(lines) + "\n")
    payload = {"machine": machine(), "wall_s": wall, "overrides": overrides, "runs": runs}
    (OUT / f"dense{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
