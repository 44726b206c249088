"""Adversarial distillation on digits, against the scratch student and plain KD.

    python benchmarks/adversarial.py            # 3 seeds, all labels and 5% of the labels
    python benchmarks/adversarial.py --sweep    # 1 seed, 5% labels: weight x critic_lr x temperature

Teacher: CNN 151k parameters; student: MLP 4.8k parameters (recipes/digits_adversarial.yaml).
Per seed the teacher is trained once and reused by every method; the scratch student is the same
architecture trained on the labels it has. The critic accuracy is the last epoch's mean over the
training batches (0.5 = chance: the critic cannot tell the student's outputs from the teacher's).
Writes benchmarks/results/adversarial.md|json (or adversarial_sweep.md|json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import machine, mean_std
from stillroom.config import load_recipe
from stillroom.methods.classic import run_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_adversarial.yaml"
NO_TERMS = "distill.terms=[]"
# the recipe's own adversarial term (weight, critic_lr, temperature as shipped) unless overridden
METHODS: dict[str, list[str]] = {
    "KD (Hinton)": [NO_TERMS],
    "KD + adversarial (outputs)": [],
    "adversarial (outputs) + CE, no KD term": ["distill.alpha=0.0"],
}
SWEEP_WEIGHTS = (0.3, 1.0, 3.0)
SWEEP_CRITIC_LRS = (2e-4, 1e-3)
SWEEP_TEMPERATURES = (1.0, 4.0)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "student_kd" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def critic_accuracy(run_dir: Path) -> tuple[float | None, float | None]:
    """(first epoch, last epoch) critic accuracy of the distilled student's run, if it had one."""
    records = _records(run_dir)
    keys = [k for k in records[0] if k.endswith("/critic_accuracy")]
    if not keys:
        return None, None
    return records[0][keys[0]], records[-1][keys[0]]


def _term(weight: float, critic_lr: float, temperature: float) -> str:
    return (
        f"distill.terms=[{{kind: adversarial, weight: {weight}, critic_lr: {critic_lr}, "
        f"temperature: {temperature}}}]"
    )


def run_methods(
    methods: dict[str, list[str]], seed: int, base: list[str], tmp: Path
) -> dict[str, dict[str, float | None]]:
    """Per method: test accuracy, first/last critic accuracy, seconds; plus teacher and scratch."""
    rows: dict[str, dict[str, float | None]] = {}
    first = tmp / f"seed{seed}-first"
    for i, (method, overrides) in enumerate(methods.items()):
        t0 = time.perf_counter()
        extra = [f"seed={seed}", *base, *overrides]
        if i == 0:
            run_dir = first  # trains the teacher and the scratch student once per seed
        else:
            run_dir = tmp / f"seed{seed}-{i}"
            extra += [f"teacher.checkpoint={first / 'teacher'}", "baseline=false"]
        result = run_recipe(load_recipe(RECIPE, extra), run_dir, progress=False)
        if i == 0:
            for role in ("teacher", "student_scratch"):
                rows[role] = {"accuracy": result.rows[role]["accuracy"]}
        start, end = critic_accuracy(run_dir)
        rows[method] = {
            "accuracy": result.rows["student_kd"]["accuracy"],
            "critic_accuracy_first": start,
            "critic_accuracy_last": end,
            "seconds": time.perf_counter() - t0,
        }
        critic = f", critic {start:.3f} -> {end:.3f}" if end is not None else ""
        print(
            f"seed {seed} {base[0]} {method}: {rows[method]['accuracy']:.4f}{critic} "
            f"({rows[method]['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def table(per_seed: list[dict[str, dict[str, float | None]]], methods: list[str]) -> list[str]:
    def values(role: str, key: str) -> list[float]:
        return [seed[role][key] for seed in per_seed if seed[role].get(key) is not None]

    teacher, scratch = values("teacher", "accuracy"), values("student_scratch", "accuracy")
    lines = [
        "| method | test accuracy | gap closed | critic accuracy, first -> last epoch |",
        "|---|---|---|---|",
        f"| teacher | {mean_std(teacher)} | - | - |",
        f"| student from labels only | {mean_std(scratch)} | 0 | - |",
    ]
    for method in methods:
        accuracy = values(method, "accuracy")
        gaps = [
            (k - s) / (t - s) for k, s, t in zip(accuracy, scratch, teacher, strict=True) if t != s
        ]
        first, last = (
            values(method, "critic_accuracy_first"),
            values(method, "critic_accuracy_last"),
        )
        critic = f"{mean_std(first)} -> {mean_std(last)}" if last else "-"
        lines.append(f"| {method} | {mean_std(accuracy)} | {mean_std(gaps)} | {critic} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--label-fractions", type=float, nargs="+", help="default 1.0 0.05 (sweep: 0.05)"
    )
    parser.add_argument("--sweep", action="store_true", help="1-seed grid for the term's defaults")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.sweep and args.seeds < 3:
        parser.error("use at least 3 seeds")
    seeds = [0] if args.sweep else list(range(args.seeds))
    fractions = args.label_fractions or ([0.05] if args.sweep else [1.0, 0.05])
    methods = METHODS
    if args.sweep:
        methods = {"KD (Hinton)": [NO_TERMS]}
        for alpha, what in ((0.9, "KD + adv"), (0.0, "adv + CE")):
            for w in SWEEP_WEIGHTS:
                for lr in SWEEP_CRITIC_LRS:
                    for t in SWEEP_TEMPERATURES:
                        label = f"{what}, weight {w}, critic_lr {lr:g}, temperature {t:g}"
                        methods[label] = [f"distill.alpha={alpha}", _term(w, lr, t)]

    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    sections: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in fractions:
            base = [f"data.label_fraction={fraction}"]
            per_seed = [
                run_methods(methods, seed, base, Path(tmp) / str(fraction)) for seed in seeds
            ]
            results[f"label_fraction={fraction:g}"] = per_seed
            sections += [
                "",
                f"**{fraction:.0%} of the training labels** (soft targets on every training input)",
                "",
                *table(per_seed, list(methods)),
            ]

    command = "python benchmarks/adversarial.py" + (" --sweep" if args.sweep else "")
    if args.label_fractions:
        command += " --label-fractions " + " ".join(f"{f:g}" for f in args.label_fractions)
    head = [
        f"Command: `{command}` (recipes/digits_adversarial.yaml: CNN teacher 151k params -> MLP "
        "student 4.8k, 60 distillation epochs; the adversarial term as shipped unless the row says)",
        "",
        f"Machine: {machine()}. Seeds {', '.join(map(str, seeds))}; test accuracy mean +- std; "
        f"total {time.perf_counter() - started:.0f} s. Critic accuracy: mean over the last "
        "epoch's training batches (0.5 = chance).",
    ]
    text = "\n".join(head + sections) + "\n"
    print(text)
    stem = "adversarial_sweep" if args.sweep else "adversarial"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
