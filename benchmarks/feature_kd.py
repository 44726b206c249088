"""Feature, relational and decoupled distillation on digits, against scratch and plain KD.

    python benchmarks/feature_kd.py                       # 3 seeds, 5% of the labels
    python benchmarks/feature_kd.py --label-fraction 1.0  # every label

Teacher: ResNet 175k parameters; student: ResNet 5.1k parameters (recipes/digits_resnet.yaml).
Per seed the teacher is trained once and reused by every method; the scratch student is the same
architecture trained on the labels it has. Writes benchmarks/results/feature_kd_<labels>.md|json.
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
from stillroom.config import load_recipe
from stillroom.methods.classic import run_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_resnet.yaml"
NO_TERMS = "distill.terms=[]"
METHODS: dict[str, list[str]] = {
    "KD (Hinton)": [NO_TERMS],
    "KD + FitNets hint (stages.2)": [
        "distill.terms=[{kind: hint, weight: 1.0, student: stages.2, teacher: stages.2}]"
    ],
    "KD + attention transfer (all stages)": [
        "distill.terms=[{kind: attention_transfer, weight: 30.0, student: 'stages.*', teacher: 'stages.*'}]"
    ],
    "RKD distance + angle (pool) + CE": [
        "distill.alpha=0.0",
        "distill.terms=[{kind: rkd_distance, weight: 25.0, student: pool, teacher: pool},"
        " {kind: rkd_angle, weight: 50.0, student: pool, teacher: pool}]",
    ],
    "DKD (alpha=1, beta=8) + CE": ["distill.loss=dkd", "distill.alpha=0.5", NO_TERMS],
}


def epoch_seconds(run_dir: Path) -> float:
    records = [
        json.loads(x) for x in (run_dir / "student_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    return statistics.median(r["epoch_seconds"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label-fraction", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.seeds < 3:
        parser.error("use at least 3 seeds")
    # shorter than the recipe's defaults so 3 seeds x 5 methods fit in minutes on 2 CPU cores
    base = [
        f"data.label_fraction={args.label_fraction}",
        "data.batch_size=128",
        "teacher.train.epochs=15",
        "distill.epochs=20",
    ]
    accuracy: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            first = Path(tmp) / f"seed{seed}-kd"
            for i, (method, overrides) in enumerate(METHODS.items()):
                t0 = time.perf_counter()
                extra = [f"seed={seed}", *base, *overrides]
                if i == 0:
                    run_dir = first  # trains the teacher and the scratch student once per seed
                else:
                    run_dir = Path(tmp) / f"seed{seed}-{i}"
                    extra += [f"teacher.checkpoint={first / 'teacher'}", "baseline=false"]
                result = run_recipe(load_recipe(RECIPE, extra), run_dir, progress=False)
                if i == 0:
                    for role in ("teacher", "student_scratch"):
                        accuracy.setdefault(role, []).append(result.rows[role]["accuracy"])
                accuracy.setdefault(method, []).append(result.rows["student_kd"]["accuracy"])
                seconds.setdefault(method, []).append(epoch_seconds(run_dir))
                print(
                    f"seed {seed} {method}: {result.rows['student_kd']['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    teacher, scratch = accuracy["teacher"], accuracy["student_scratch"]
    lines = [
        f"Command: `python benchmarks/feature_kd.py --seeds {args.seeds} --label-fraction {args.label_fraction}` "
        f"(recipes/digits_resnet.yaml with {' '.join(base[1:])})",
        "",
        f"Machine: {machine()}. Digits, ResNet teacher (175k params) -> ResNet student (5.1k), "
        f"{args.label_fraction:.0%} of the training labels (soft targets/features on every training input), "
        f"seeds 0..{args.seeds - 1}, test accuracy mean +- std. Total {time.perf_counter() - started:.0f} s.",
        "",
        "| method | test accuracy | gap closed | student epoch time (median) |",
        "|---|---|---|---|",
        f"| teacher | {mean_std(teacher)} | - | - |",
        f"| student from labels only | {mean_std(scratch)} | 0 | - |",
    ]
    for method in METHODS:
        gaps = [
            (k - s) / (t - s)
            for k, s, t in zip(accuracy[method], scratch, teacher, strict=True)
            if t != s
        ]
        lines.append(
            f"| {method} | {mean_std(accuracy[method])} | {mean_std(gaps)} | {statistics.median(seconds[method]):.2f} s |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    stem = f"feature_kd_labels{args.label_fraction:g}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(
        json.dumps({"accuracy": accuracy, "epoch_seconds": seconds}, indent=2)
    )


if __name__ == "__main__":
    main()
