"""Ensemble distillation on digits, against the scratch student and plain KD from the best member.

    python benchmarks/ensemble.py                                   # 3 seeds, all labels and 5%

recipes/digits_ensemble.yaml: three members of different architectures (CNN, ResNet, MLP), each
trained on every training label with its own seed, merged into one soft label, distilled into one
MLP (4.8k parameters). Per seed the members are trained once and reused by every variant:
    - the student from labels alone (scratch),
    - plain KD from the best single member (chosen by validation accuracy, not test),
    - KD from the ensemble: mean of probabilities (uniform weights), mean of logits (uniform), and
      mean of probabilities with weights fitted on the validation split.
With a label fraction below 1 the students see that share of the labels and the teachers' soft
targets on every training input (the members always saw every label). Writes
benchmarks/results/ensemble.md|json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import machine, mean_std
from stillroom.config import Recipe
from stillroom.methods import load_method_recipe
from stillroom.methods.classic import run_recipe
from stillroom.methods.ensemble import EnsembleRecipe, run_ensemble

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_ensemble.yaml"
VARIANTS = {  # name -> overrides of a run whose members are loaded from the first run
    "KD from ensemble, mean of logits": ["ensemble.combine=mean_logit"],
    "KD from ensemble, mean of probs, val-fitted weights": ["ensemble.learn_weights=true"],
}
PROB = "KD from ensemble, mean of probs"
BEST = "KD from best member (plain KD)"


def best_member(run_dir: Path, count: int) -> int:
    """The member with the best validation accuracy of its best epoch (the test split is not used)."""

    def best_val(i: int) -> float:
        lines = (run_dir / f"teacher_{i}" / "metrics.jsonl").read_text().splitlines()
        return max(json.loads(line)["val/accuracy"] for line in lines)

    return max(range(count), key=best_val)


def classic_from(recipe: EnsembleRecipe, teacher: Path) -> Recipe:
    """The same data, student and distillation settings as a classic recipe with one teacher."""
    fields = recipe.model_dump(include={"name", "seed", "data", "student", "distill", "cpu"})
    return Recipe.model_validate({**fields, "teacher": {"checkpoint": teacher}, "baseline": False})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label-fractions", type=float, nargs="+", default=[1.0, 0.05])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.seeds < 3:
        parser.error("use at least 3 seeds")
    started = time.perf_counter()
    # teachers[name] = accuracies over seeds; students[fraction][name] = (accuracy, teacher) pairs
    teachers: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    weights: list[list[float]] = []
    students: dict[float, dict[str, list[tuple[float, float]]]] = {
        f: {} for f in args.label_fractions
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for f_index, fraction in enumerate(args.label_fractions):
                t0 = time.perf_counter()
                common = [f"seed={seed}", f"data.label_fraction={fraction}"]
                first = Path(tmp) / f"seed{seed}-members"
                if f_index == 0:  # trains the members once per seed
                    _, recipe = load_method_recipe(RECIPE, common)
                    result = run_ensemble(recipe, first, progress=False)
                    count = len(recipe.teachers)
                    for i, member in enumerate(recipe.teachers):
                        name = f"member {i}: {member.kind}"
                        teachers.setdefault(name, []).append(
                            result.rows[f"teacher_{i}"]["accuracy"]
                        )
                        params[name] = result.rows[f"teacher_{i}"]["parameters"]
                    loaded = "teachers=[" + ", ".join(
                        f"{{checkpoint: {first / f'teacher_{i}'}}}" for i in range(count)
                    )
                    loaded += "]"
                    best = best_member(first, count)
                else:
                    _, recipe = load_method_recipe(RECIPE, [*common, loaded])
                    result = run_ensemble(
                        recipe, Path(tmp) / f"seed{seed}-{fraction}", progress=False
                    )
                record(
                    teachers, params, "ensemble, mean of probs", result.rows["ensemble"], f_index
                )
                ensemble_acc = result.rows["ensemble"]["accuracy"]
                scratch = result.rows["student_scratch"]["accuracy"]
                params["student"] = result.rows["student_kd"]["parameters"]
                add = students[fraction].setdefault
                add("student from labels only", []).append((scratch, ensemble_acc))
                add(PROB, []).append((result.rows["student_kd"]["accuracy"], ensemble_acc))

                for v_index, (variant, overrides) in enumerate(VARIANTS.items()):
                    extra = [*common, loaded, "baseline=false", *overrides]
                    _, variant_recipe = load_method_recipe(RECIPE, extra)
                    run_dir = Path(tmp) / f"seed{seed}-{fraction}-v{v_index}"
                    variant_result = run_ensemble(variant_recipe, run_dir, progress=False)
                    row = variant_result.rows["ensemble"]
                    record(teachers, params, variant.replace("KD from ", ""), row, f_index)
                    kd = variant_result.rows["student_kd"]["accuracy"]
                    add(variant, []).append((kd, row["accuracy"]))
                    if "fitted" in variant and f_index == 0:
                        weights.append(variant_result.weights)

                single = classic_from(recipe, first / f"teacher_{best}")
                single_result = run_recipe(
                    single, Path(tmp) / f"seed{seed}-{fraction}-best", progress=False
                )
                teacher_acc = single_result.rows["teacher"]["accuracy"]
                add(BEST, []).append((single_result.rows["student_kd"]["accuracy"], teacher_acc))
                print(
                    f"seed {seed} labels {fraction:g}: ensemble {ensemble_acc:.4f} scratch {scratch:.4f} "
                    f"kd(ensemble) {result.rows['student_kd']['accuracy']:.4f} "
                    f"kd(best member {best}) {single_result.rows['student_kd']['accuracy']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    lines = [
        f"Command: `python benchmarks/ensemble.py --seeds {args.seeds} --label-fractions "
        f"{' '.join(f'{f:g}' for f in args.label_fractions)}` (recipes/digits_ensemble.yaml)",
        "",
        f"Machine: {machine()}. Digits, seeds 0..{args.seeds - 1}, test accuracy mean +- std "
        f"over seeds. Total {time.perf_counter() - started:.0f} s.",
        "",
        "**Teachers** (every member trained on all training labels, its own seed)",
        "",
        "| teacher | parameters | test accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {params[name]:,} | {mean_std(acc)} |" for name, acc in teachers.items()]
    mean_weights = [sum(w[i] for w in weights) / len(weights) for i in range(len(weights[0]))]
    lines += [
        "",
        "Val-fitted weights (mean over seeds): "
        + ", ".join(f"member {i} {w:.2f}" for i, w in enumerate(mean_weights)),
    ]
    for fraction, table in students.items():
        scratch = [acc for acc, _ in table["student from labels only"]]
        best = [acc for acc, _ in table[BEST]]
        lines += [
            "",
            f"**Students** (MLP, {params['student']:,} parameters), {fraction:.0%} of the training "
            "labels; gap closed = (student - scratch) / (its teacher - scratch), per seed",
            "",
            "| student | test accuracy | gap closed vs its teacher | beats scratch | beats plain KD from best member |",
            "|---|---|---|---|---|",
        ]
        for name, pairs in table.items():
            accs = [acc for acc, _ in pairs]
            gaps = [(a - s) / (t - s) for (a, t), s in zip(pairs, scratch, strict=True) if t != s]
            is_scratch = name == "student from labels only"
            wins = sum(a > s for a, s in zip(accs, scratch, strict=True))
            over_best = sum(a > b for a, b in zip(accs, best, strict=True))
            lines.append(
                f"| {name} | {mean_std(accs)} | {'0' if is_scratch else mean_std(gaps)} | "
                f"{'-' if is_scratch else f'{wins} of {len(accs)}'} | "
                f"{'-' if is_scratch or name == BEST else f'{over_best} of {len(accs)}'} |"
            )
    table_md = "\n".join(lines) + "\n"
    print(table_md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ensemble.md").write_text(table_md)
    payload: dict[str, Any] = {
        "teachers": teachers,
        "parameters": params,
        "fitted_weights": weights,
        "students": {f"{f:g}": t for f, t in students.items()},
        "note": "students: [accuracy, accuracy of that student's teacher] per seed",
    }
    (args.out / "ensemble.json").write_text(json.dumps(payload, indent=2))


def record(
    teachers: dict[str, list[float]],
    params: dict[str, int],
    name: str,
    row: dict[str, Any],
    f_index: int,
) -> None:
    """An ensemble's test accuracy, once per seed (the same teacher serves every label fraction)."""
    if f_index == 0:
        teachers.setdefault(name, []).append(row["accuracy"])
        params[name] = row["parameters"]


if __name__ == "__main__":
    main()
