"""Multi-task distillation on digits (digit classification + handwriting slant regression).

    python benchmarks/multitask.py            # 3 seeds, 1 thread

recipes/digits_multitask.yaml: a CNN-trunk teacher (151k parameters) with a digit head and a slant
head, trained on every label; an MLP-trunk student (4.9k parameters) with the same heads, trained
on the labels it is given (the scratch baseline, each task masked) or distilled per task
(alpha 0.9: soft targets at T=4 for digit, MSE to the teacher for slant). Label settings:

    all labels        every digit and every slant label
    few slant labels  every digit label, 5% of the slant labels
    few labels        5% of the digit and 5% of the slant labels (each task its own 5%)

In "few labels" three more students show where the gain comes from and what the task weights do:
distillation on the digit head only (slant alpha 0), on the slant head only (digit alpha 0), and on
every head with slant weighted 3 (both its terms). Per seed the teacher is trained once and loaded
by every other setting. Writes benchmarks/results/multitask.md|json.
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
from stillroom.methods.multitask import run_multitask

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_multitask.yaml"
COLUMNS = ("digit/accuracy", "slant/rmse")


def tasks(
    digit: float,
    slant: float,
    digit_alpha: float = 0.9,
    slant_alpha: float = 0.9,
    slant_weight: float = 1.0,
) -> str:
    """The recipe's `tasks` override: label fraction and alpha per task, slant's weight."""
    return (
        f"tasks=[{{name: digit, kind: classification, label_fraction: {digit}, alpha: {digit_alpha}}},"
        f" {{name: slant, kind: regression, label_fraction: {slant}, alpha: {slant_alpha},"
        f" weight: {slant_weight}}}]"
    )


SETTINGS: dict[str, tuple[float, float]] = {
    "all labels": (1.0, 1.0),
    "few slant labels": (1.0, 0.05),
    "few labels": (0.05, 0.05),
}
ABLATIONS: dict[str, str] = {  # (setting "few labels")
    "KD on digit only": tasks(0.05, 0.05, slant_alpha=0.0),
    "KD on slant only": tasks(0.05, 0.05, digit_alpha=0.0),
    "every task, slant weight 3": tasks(0.05, 0.05, slant_weight=3.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.seeds < 3:
        parser.error("use at least 3 seeds")
    # values[setting][model][column] -> one value per seed
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    started = time.perf_counter()

    def record(setting: str, model: str, row: dict[str, float]) -> None:
        for column in COLUMNS:
            values.setdefault(setting, {}).setdefault(model, {}).setdefault(column, [])
            values[setting][model][column].append(row[column])

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            teacher = Path(tmp) / f"seed{seed}-all labels" / "teacher"
            runs = [(s, [tasks(*f)], True) for s, f in SETTINGS.items()]
            runs += [(s, [overrides], False) for s, overrides in ABLATIONS.items()]
            for i, (name, overrides, baseline) in enumerate(runs):
                t0 = time.perf_counter()
                extra = [f"seed={seed}", *overrides, f"baseline={str(baseline).lower()}"]
                if i > 0:
                    extra.append(f"teacher.checkpoint={teacher}")
                _, recipe = load_method_recipe(RECIPE, extra)
                result = run_multitask(recipe, Path(tmp) / f"seed{seed}-{name}", progress=False)
                setting = "few labels" if name in ABLATIONS else name
                if name in SETTINGS:
                    record(setting, "teacher", result.rows["teacher"])
                    record(setting, "student from labels only", result.rows["student_scratch"])
                    record(setting, "student distilled (every task)", result.rows["student_kd"])
                else:
                    record(setting, f"student distilled ({name})", result.rows["student_kd"])
                kd = result.rows["student_kd"]
                print(
                    f"seed {seed} {name}: digit {kd['digit/accuracy']:.4f} slant rmse "
                    f"{kd['slant/rmse']:.4f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    lines = [
        f"Command: `python benchmarks/multitask.py --seeds {args.seeds}` (recipes/digits_multitask.yaml "
        "at its settings, label fractions as below)",
        "",
        f"Machine: {machine()}. Digits, two tasks on one shared trunk: digit (10 classes, test "
        "accuracy) and slant (regression, test RMSE in units of the training slant's std: 1.0 = "
        "predicting the mean). CNN-trunk teacher (151k params) -> MLP-trunk student (4.9k), "
        f"seeds 0..{args.seeds - 1}, mean +- std; gap closed = (student - scratch) / (teacher - "
        f"scratch) per seed, then mean +- std. Total {time.perf_counter() - started:.0f} s.",
        "",
        "| labels | model | digit accuracy | slant RMSE | gap closed: digit | gap closed: slant |",
        "|---|---|---|---|---|---|",
    ]
    for setting, models in values.items():
        digit, slant = SETTINGS[setting]
        labels = f"{setting} (digit {digit:.0%}, slant {slant:.0%})"
        teacher, scratch = models["teacher"], models["student from labels only"]
        for model, row in models.items():
            gaps = []
            for column in COLUMNS:
                if model in ("teacher", "student from labels only"):
                    gaps.append("-")
                    continue
                per_seed = [
                    (k - s) / (t - s)
                    for k, s, t in zip(row[column], scratch[column], teacher[column], strict=True)
                    if t != s
                ]
                gaps.append(mean_std(per_seed) if per_seed else "n/a")
            lines.append(
                f"| {labels} | {model} | {mean_std(row['digit/accuracy'])} | "
                f"{mean_std(row['slant/rmse'])} | {gaps[0]} | {gaps[1]} |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multitask.md").write_text(table)
    summary = {
        setting: {
            model: {c: {"values": v, "mean": statistics.mean(v)} for c, v in row.items()}
            for model, row in models.items()
        }
        for setting, models in values.items()
    }
    (args.out / "multitask.json").write_text(
        json.dumps({"machine": machine(), "seeds": args.seeds, "results": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
