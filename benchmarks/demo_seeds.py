"""The demo's two settings over several seeds: mean +- std of every model's test accuracy.

    python benchmarks/demo_seeds.py                      # seeds 0..4, writes benchmarks/results/
    python benchmarks/demo_seeds.py --seeds 3 distill.alpha=0.5 distill.temperature=2

Each seed changes the data split, which labels the few-label student sees, the initialisation and
the data order; the teacher is retrained per seed. Prints and writes a Markdown table (README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, mean_std
from stillroom.demo import FEW_LABEL_FRACTION, run_demo

ROLES = {
    "teacher": "teacher (CNN)",
    "student_scratch": "student from labels only",
    "student_kd": "student distilled",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1), at least 3")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="where tables go"
    )
    parser.add_argument("--tag", default="demo_seeds", help="file name stem for the results")
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides for both settings, key=value"
    )
    args = parser.parse_args()
    if args.seeds < 3:
        parser.error("use at least 3 seeds: a single run says little about distillation")

    per_setting: dict[str, dict[str, list[dict]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            demo = run_demo(
                Path(tmp) / f"seed{seed}", seed=seed, progress=False, overrides=args.overrides
            )
            for name, result in demo.settings.items():
                for role, row in result.rows.items():
                    per_setting.setdefault(name, {}).setdefault(role, []).append(row)
                per_setting[name].setdefault("gap_closed", []).append({"value": result.gap_closed})
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    lines = [
        f"Command: `python benchmarks/demo_seeds.py --seeds {args.seeds}"
        + "".join(f" {o}" for o in args.overrides)
        + "`",
        "",
        f"Machine: {machine()}. Seeds 0..{args.seeds - 1}; mean +- std over seeds; held-out test split (20% of 1,797 digits, stratified).",
        f"Total time {time.perf_counter() - started:.0f} s.",
        "",
    ]
    summary: dict[str, dict] = {}
    for name, rows in per_setting.items():
        title = (
            "(a) all labels"
            if name == "all_labels"
            else f"(b) few labels: {FEW_LABEL_FRACTION:.0%} of training labels + soft targets on every training input"
        )
        lines += [
            f"**{title}**",
            "",
            "| model | test accuracy | parameters | CPU latency, batch 1 (median) |",
            "|---|---|---|---|",
        ]
        for role, label in ROLES.items():
            accs = [r["accuracy"] for r in rows[role]]
            latency = statistics.median(r["latency_ms"] for r in rows[role])
            lines.append(
                f"| {label} | {mean_std(accs)} | {rows[role][0]['parameters']:,} | {latency:.3f} ms |"
            )
            summary.setdefault(name, {})[role] = accs
        gaps = [g["value"] for g in rows["gap_closed"] if g["value"] is not None]
        wins = sum(
            k["accuracy"] > s["accuracy"]
            for k, s in zip(rows["student_kd"], rows["student_scratch"], strict=True)
        )
        lines += [
            "",
            f"gap closed = (kd - scratch) / (teacher - scratch): {mean_std(gaps)} over the "
            f"{len(gaps)} of {args.seeds} seeds where the teacher leads the scratch student; "
            f"distilled beats scratch on {wins} of {args.seeds} seeds.",
            "",
        ]
        summary[name]["gap_closed"] = gaps
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.md").write_text(table)
    (args.out / f"{args.tag}.json").write_text(
        json.dumps({"overrides": args.overrides, "accuracy": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
