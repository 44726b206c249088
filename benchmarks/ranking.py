"""Ranking distillation on MovieLens-100K: an ensemble (NeuMF + two-tower + NeuMF) into an MF.

    .venv/bin/pip install --no-deps recbole      # ships ml-100k; never imported, read by path
    python benchmarks/ranking.py                 # 5 seeds, recipes/movielens_ranking.yaml

Per seed one run of the recipe: the members and their ensemble (the teacher), the MF student from
labels alone (scratch) and one MF student per distillation term (pointwise soft labels, ranking
distillation, listwise KL, relaxed ranking). Test: 1 held-out positive per user against 99 (and
499) sampled negatives, full-catalogue recall@20. Writes benchmarks/results/ranking.md|json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, mean_std
from stillroom.methods import load_method_recipe
from stillroom.methods.ranking import run_ranking

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "movielens_ranking.yaml"
OUT = ROOT / "benchmarks" / "results"
METRICS = ("ndcg@10", "hr@10", "auc", "ndcg@10_499neg", "recall@20_full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    start = time.time()
    per_seed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            _, recipe = load_method_recipe(RECIPE, [f"seed={seed}", *args.overrides])
            summary = run_ranking(recipe, Path(tmp) / f"seed{seed}", progress=False)
            per_seed.append(
                {
                    "seed": seed,
                    "primary": summary.primary,
                    "models": {
                        m.name: {
                            "role": m.role,
                            "metrics": m.metrics,
                            "parameters": m.parameters,
                            "size_bytes": m.size_bytes,
                            "latency_ms": m.latency_ms,
                        }
                        for m in summary.models
                    },
                    "notes": summary.notes,
                }
            )
            print(f"seed {seed} done at {time.time() - start:.0f} s", flush=True)
    wall = time.time() - start
    write(per_seed, wall, args.overrides)


def write(per_seed: list[dict[str, Any]], wall: float, overrides: list[str]) -> None:
    names = list(per_seed[0]["models"])
    teacher = "ensemble" if "ensemble" in names else "teacher"
    scratch = [s["models"]["student_scratch"]["metrics"]["ndcg@10"] for s in per_seed]
    lines = [
        "# Ranking distillation on MovieLens-100K",
        "",
        f"`python benchmarks/ranking.py` ({len(per_seed)} seeds, recipe "
        f"recipes/movielens_ranking.yaml{', overrides ' + ' '.join(overrides) if overrides else ''}"
        f"); machine: {machine()}, shared with other jobs at the time (wall times measured under "
        f"contention are not clean timings); whole benchmark {wall / 60:.1f} min wall.",
        "",
        "| model | " + " | ".join(METRICS) + " | % teacher ndcg@10 | parameters | ms (100 cand.) "
        "| users/s |",
        "|---|" + "---|" * (len(METRICS) + 4),
    ]
    for name in names:
        rows = [s["models"][name] for s in per_seed]
        cells = [mean_std([r["metrics"][k] for r in rows]) for k in METRICS]
        ratio = [r["metrics"]["ndcg@10"] / s["models"][teacher]["metrics"]["ndcg@10"]
                 for r, s in zip(rows, per_seed, strict=True)]  # fmt: skip
        lat = sorted(r["latency_ms"] for r in rows)[len(rows) // 2]
        ups = sorted(r["metrics"]["users_per_s"] for r in rows)[len(rows) // 2]
        lines.append(
            f"| {name} ({rows[0]['role']}) | " + " | ".join(cells)
            + f" | {100 * sum(ratio) / len(ratio):.1f}% | {rows[0]['parameters']:,} | {lat:.3f} "
            f"| {ups:,.0f} |"
        )  # fmt: skip
    lines += ["", "Beats the scratch student by more than the seed spread (ndcg@10):", ""]
    spread = _std(scratch)
    for name in names:
        if per_seed[0]["models"][name]["role"] != "distilled":
            continue
        values = [s["models"][name]["metrics"]["ndcg@10"] for s in per_seed]
        diff = [v - b for v, b in zip(values, scratch, strict=True)]
        gain = sum(diff) / len(diff)
        verdict = "yes" if gain > max(spread, _std(values)) else "no"
        lines.append(
            f"- {name}: {gain:+.4f} over scratch (paired, per-seed diffs {_fmt(diff)}); spread "
            f"(std) scratch {spread:.4f}, this {_std(values):.4f}: {verdict}"
        )
    lines += ["", "Notes of seed 0:", "", *(f"- {n}" for n in per_seed[0]["notes"])]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ranking.md").write_text("\n".join(lines) + "\n")
    payload = {"machine": machine(), "wall_s": wall, "overrides": overrides, "seeds": per_seed}
    (OUT / "ranking.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n".join(lines))


def _std(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


if __name__ == "__main__":
    main()
