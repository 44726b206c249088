"""Born-again and teacher-assistant chains on digits, against scratch students and plain KD.

    python benchmarks/born_again.py                        # 3 seeds, every label
    python benchmarks/born_again.py --label-fraction 0.05  # students see 5% of the labels

(a) Teacher-assistant chains (Mirzadeh et al. 2020), recipes/digits_ta_chain.yaml: a CNN teacher
    (151k parameters) and the smallest student, MLP 16 (1.2k). Plain KD (CNN -> MLP 16), one
    assistant (CNN -> MLP 32 -> MLP 16) and the recipe's chain (CNN -> MLP 64 -> MLP 32 -> MLP 16),
    all from the same teacher per seed; the scratch students have the same architectures.
(b) Born-again networks (Furlanello et al. 2018), recipes/digits_born_again.yaml with three
    generations: MLP 64 trained on labels (gen-0) -> MLP 64 -> MLP 64 -> MLP 64. gen-1 is plain KD
    into a student of the teacher's size.

Writes benchmarks/results/born_again_labels<fraction>.md|json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import machine, mean_std
from stillroom.methods import load_method_recipe
from stillroom.methods.born_again import run_chain

RECIPES = Path(__file__).parent.parent / "recipes"
MLP = "{{kind: mlp, hidden: [{}]}}"
TA_VARIANTS = {
    "plain KD: CNN -> MLP 16": [16],
    "one assistant: CNN -> MLP 32 -> MLP 16": [32, 16],
}


def generations(*widths: int) -> str:
    return "generations=[" + ", ".join(MLP.format(w) for w in widths) + "]"


def run(recipe: str, overrides: list[str], run_dir: Path) -> dict[str, dict]:
    chain = load_method_recipe(RECIPES / recipe, overrides)[1]
    return run_chain(chain, run_dir, progress=False).rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.seeds < 3:
        parser.error("use at least 3 seeds")
    base = [f"data.label_fraction={args.label_fraction}"]
    acc: dict[str, list[float]] = {}
    agree: dict[str, list[float]] = {}
    params: dict[str, int] = {}

    def record(label: str, row: dict) -> None:
        acc.setdefault(label, []).append(row["accuracy"])
        params[label] = row["parameters"]
        if "agreement_gen0" in row:
            agree.setdefault(label, []).append(row["agreement_gen0"])

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            common = [f"seed={seed}", *base]
            ta_dir = Path(tmp) / f"ta-{seed}"
            rows = run("digits_ta_chain.yaml", common, ta_dir)
            record("teacher: CNN", rows["gen-0"])
            for k, width in enumerate((64, 32, 16), start=1):
                record(f"scratch: MLP {width}", rows[f"scratch-gen-{k}"])
            record("chain gen-1: CNN -> MLP 64", rows["gen-1"])
            record("chain gen-2: ... -> MLP 32", rows["gen-2"])
            record("chain: CNN -> MLP 64 -> MLP 32 -> MLP 16", rows["gen-3"])
            for i, (label, widths) in enumerate(TA_VARIANTS.items()):
                teacher = f"teacher.checkpoint={ta_dir / 'gen-0'}"
                extra = [*common, teacher, generations(*widths), "baseline=false"]
                rows = run("digits_ta_chain.yaml", extra, Path(tmp) / f"ta-{seed}-{i}")
                record(label, rows[f"gen-{len(widths)}"])
            rows = run(
                "digits_born_again.yaml",
                [*common, generations(64, 64, 64)],
                Path(tmp) / f"ba-{seed}",
            )
            record("born-again gen-0: MLP 64 from labels", rows["gen-0"])
            record("born-again scratch: MLP 64", rows["scratch-gen-1"])
            for k in (1, 2, 3):
                record(f"born-again gen-{k}: MLP 64", rows[f"gen-{k}"])
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    def line(label: str, scratch: str | None, teacher: str) -> str:
        gap = "-"
        if scratch is not None:
            gaps = [
                (k - s) / (t - s)
                for k, s, t in zip(acc[label], acc[scratch], acc[teacher], strict=True)
                if t != s
            ]
            gap = mean_std(gaps) if gaps else "n/a (scratch = teacher)"
        agreement = mean_std(agree[label]) if label in agree else "-"
        return f"| {label} | {params[label]:,} | {mean_std(acc[label])} | {gap} | {agreement} |"

    def delta(a: str, b: str) -> str:
        diffs = [x - y for x, y in zip(acc[a], acc[b], strict=True)]
        wins = sum(d > 0 for d in diffs)
        return f"{mean_std(diffs)} ({wins}/{len(diffs)} seeds better)"

    header = [
        "| model | parameters | test accuracy | gap closed | agreement with the teacher (gen-0) |",
        "|---|---|---|---|---|",
    ]
    cnn = "teacher: CNN"
    lines = [
        f"Command: `python benchmarks/born_again.py --seeds {args.seeds} --label-fraction {args.label_fraction}` "
        "(recipes/digits_ta_chain.yaml and recipes/digits_born_again.yaml as shipped: teacher 20/40 "
        "epochs, every student 40 epochs, alpha 0.9, T 4)",
        "",
        f"Machine: {machine()}. Digits (1,259 train / 179 val / 359 test), "
        f"{args.label_fraction:.0%} of the training labels for the students (soft targets on every "
        f"training input; the teacher sees every label), seeds 0..{args.seeds - 1}, mean +- std. "
        f"Total {time.perf_counter() - started:.0f} s. Gap closed = (student - scratch) / "
        "(teacher - scratch), the scratch student having the student's architecture.",
        "",
        "### (a) Teacher-assistant chains: CNN teacher -> MLP 16",
        "",
        *header,
        line(cnn, None, cnn),
        line("scratch: MLP 16", None, cnn),
        *(line(label, "scratch: MLP 16", cnn) for label in TA_VARIANTS),
        line("chain: CNN -> MLP 64 -> MLP 32 -> MLP 16", "scratch: MLP 16", cnn),
        "",
        "The chain's assistants, against their own scratch students:",
        "",
        *header,
        line("scratch: MLP 64", None, cnn),
        line("chain gen-1: CNN -> MLP 64", "scratch: MLP 64", cnn),
        line("scratch: MLP 32", None, cnn),
        line("chain gen-2: ... -> MLP 32", "scratch: MLP 32", cnn),
        "",
        "Chain minus plain KD for MLP 16: "
        + delta("chain: CNN -> MLP 64 -> MLP 32 -> MLP 16", "plain KD: CNN -> MLP 16")
        + "; one assistant minus plain KD: "
        + delta("one assistant: CNN -> MLP 32 -> MLP 16", "plain KD: CNN -> MLP 16")
        + ".",
        "",
        "### (b) Born-again networks: MLP 64 -> MLP 64 -> MLP 64 -> MLP 64",
        "",
        *header,
    ]
    ban0 = "born-again gen-0: MLP 64 from labels"
    lines.append(line(ban0, None, ban0))
    lines.append(line("born-again scratch: MLP 64", None, ban0))
    for k in (1, 2, 3):
        # no gap closed: gen-0 and the scratch student are the same network trained the same way
        lines.append(line(f"born-again gen-{k}: MLP 64", None, ban0))
    lines += [
        "",
        f"gen-1 minus gen-0: {delta('born-again gen-1: MLP 64', ban0)}; "
        f"gen-2 minus gen-1: {delta('born-again gen-2: MLP 64', 'born-again gen-1: MLP 64')}; "
        f"gen-3 minus gen-2: {delta('born-again gen-3: MLP 64', 'born-again gen-2: MLP 64')}.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    stem = f"born_again_labels{args.label_fraction:g}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    payload = {"accuracy": acc, "agreement_gen0": agree, "parameters": params}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
