"""Federated distillation on digits: FedAvg vs FedDF vs local-only vs centralised, 3 seeds.

    python benchmarks/federated.py                    # 10 clients, alpha 0.1, homogeneous MLP 64
    python benchmarks/federated.py --heterogeneous    # clients alternate MLP 64 / CNN 16-32

Every run is recipes/digits_federated.yaml (with the overrides below) through run_federated, into
a temporary folder. Writes benchmarks/results/federated[_hetero]_alpha<alpha>.md|json: final-round
test accuracy (mean +- std over seeds), accuracy per round, bytes per round per client, seconds.
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
from stillroom.methods.federated import read_rounds, run_federated

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "digits_federated.yaml"
HETERO = [
    "client_models=[{kind: mlp, hidden: [64]}, {kind: cnn, channels: [16, 32], hidden: [64]}]"
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--heterogeneous", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # many tiny trainings: threads only contend on a shared machine
    rows: dict[str, list[float]] = {}
    curves: dict[str, list[list[float]]] = {}
    bytes_per_round: dict[str, float] = {}
    seconds = []
    for seed in args.seeds:
        overrides = [f"seed={seed}", f"federated.alpha={args.alpha}"]
        overrides += [f"federated.rounds={args.rounds}"] if args.rounds else []
        overrides += HETERO if args.heterogeneous else []
        _, recipe = load_method_recipe(RECIPE, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = run_federated(recipe, Path(tmp) / "run", progress=False)
            seconds.append(time.perf_counter() - start)
            record = read_rounds(Path(tmp) / "run")
        for row in summary.models:
            name = "local-only (mean of clients)" if row.role == "client" else row.name
            if row.role == "client" and not row.name.endswith("_0"):
                continue
            value = (
                statistics.mean(record["local_only"])
                if row.role == "client"
                else row.metrics["accuracy"]
            )
            rows.setdefault(name, []).append(value)
            if "bytes_per_round_per_client" in row.metrics:
                bytes_per_round[name] = row.metrics["bytes_per_round_per_client"]
        for algorithm, history in record["histories"].items():
            for g in range(len(history[0]["accuracy"])):
                key = f"{algorithm}[{g}]"
                curves.setdefault(key, []).append([h["accuracy"][g] for h in history])
    tag = ("federated_hetero" if args.heterogeneous else "federated") + f"_alpha{args.alpha}"
    mean_curves = {
        k: [statistics.mean(r[i] for r in v) for i in range(len(v[0]))] for k, v in curves.items()
    }
    lines = [
        f"# Federated distillation on digits ({tag})",
        "",
        f"`python benchmarks/federated.py --alpha {args.alpha}"
        + (" --heterogeneous" if args.heterogeneous else "")
        + "`; recipe recipes/digits_federated.yaml, seeds "
        + ", ".join(map(str, args.seeds)),
        "",
        "| model | test accuracy (final round) | bytes up per round per client |",
        "|---|---|---|",
    ]
    for name, values in rows.items():
        sent = f"{bytes_per_round[name]:,.0f}" if name in bytes_per_round else "-"
        lines.append(f"| {name} | {mean_std(values)} | {sent} |")
    lines += ["", "mean test accuracy per round:", ""]
    lines += [f"- {k}: " + ", ".join(f"{a:.3f}" for a in v) for k, v in mean_curves.items()]
    lines += [
        "",
        f"machine: {machine()}; 2 cores shared with other jobs at the time (wall times are not "
        f"clean timings): {statistics.mean(seconds):.0f} s per seed",
    ]
    out = ROOT / "benchmarks" / "results"
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    payload = {"rows": rows, "curves": mean_curves, "seconds": seconds, "machine": machine()}
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
