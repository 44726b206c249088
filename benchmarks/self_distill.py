"""Self-distillation (Be Your Own Teacher) on digits, per exit, against deep supervision, each exit's
architecture trained alone, and plain KD into the shallowest exit's architecture.

    python benchmarks/self_distill.py            # 3 seeds, ~5 min on one busy CPU thread

Network: recipes/digits_self_distill.yaml with a thinner ResNet (widths [8, 16, 32], one block per
stage: exits exit1, exit2, final). Per seed:
    (a)  self-distilled network (alpha 0.5, T 3), the recipe's workflow (`run_self_distill`)
    (a') the same with feature hints (exit bottleneck maps -> the last stage's map, weight 0.1)
    (b)  deeply supervised: the same network, CE on every exit only
    (c)  the plain network without exits, from scratch; it is also the teacher of plain KD
    standalone scratch: each shallow exit's architecture (stem + stages up to it + its exit
         branch) trained alone on labels
    plain KD: the exit1 architecture distilled from (c) with the classic loop (alpha 0.5, T 3)
Writes benchmarks/results/self_distill.md|json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from common import machine, mean_std
from stillroom.data import make_loader
from stillroom.methods import load_method_recipe
from stillroom.methods.self_distill import interleaved_latency, run_self_distill
from stillroom.models import build_model, load_model
from stillroom.models.multiexit import exit_model
from stillroom.pipeline import prepare_data
from stillroom.train import distill, evaluate

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_self_distill.yaml"
BASE = [
    "self_distill.widths=[8,16,32]",
    "self_distill.blocks=[1,1,1]",
    "distill.epochs=20",
    "distill.lr=0.01",
    "data.batch_size=64",
]
HINT_WEIGHT = 0.1
EXITS = ("exit1", "exit2", "final")
WHOLE = "all exits (the multi-exit network)"


def _standalone(recipe, name: str, teacher, seed: int) -> float:
    """Test accuracy of exit `name`'s architecture trained alone: on labels, or with classic KD."""
    splits, _ = prepare_data(recipe)
    spec = recipe.self_distill.spec(name)
    torch.manual_seed(seed)
    student = build_model(spec, splits.train.input_shape, splits.train.num_outputs)
    result = distill(
        teacher,
        student,
        make_loader(splits.train, recipe.data.batch_size, shuffle=True),
        make_loader(splits.val, 512, shuffle=False),
        alpha=0.5 if teacher is not None else 0.0,
        temperature=3.0,
        epochs=recipe.distill.epochs,
        lr=recipe.distill.lr,
        seed=seed,
        progress=False,
    )
    test = make_loader(splits.test, 512, shuffle=False)
    return evaluate(result.student, test, "classification")["accuracy"]


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one single-sample forward (convolutions and linear layers)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        else:
            total += output.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for handle in handles:
        handle.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.seeds < 3:
        parser.error("use at least 3 seeds")
    acc: dict[str, list[float]] = {}
    costs: dict[str, dict[str, float]] = {}
    started = time.perf_counter()

    def add(key: str, value: float) -> None:
        acc.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            _, recipe = load_method_recipe(RECIPE, [f"seed={seed}", *BASE])
            run = run_self_distill(recipe, Path(tmp) / f"seed{seed}", progress=False)
            for name, row in run.exits.items():
                add(f"{name}/self_distilled", row["self_distilled"])
                add(f"{name}/deeply_supervised", row["deeply_supervised"])
            add("scratch", run.scratch["accuracy"])
            hints = [f"self_distill.feature_weight={HINT_WEIGHT}", "baseline=false"]
            _, hinted = load_method_recipe(RECIPE, [f"seed={seed}", *BASE, *hints])
            run_h = run_self_distill(hinted, Path(tmp) / f"seed{seed}-hints", progress=False)
            for name, row in run_h.exits.items():
                add(f"{name}/self_distilled_hints", row["self_distilled"])
            teacher = load_model(Path(tmp) / f"seed{seed}" / "scratch")[0]
            for name in EXITS[:-1]:
                add(f"{name}/standalone", _standalone(recipe, name, None, seed))
            add("exit1/plain_kd", _standalone(recipe, "exit1", teacher, seed))
            if seed == 0:  # costs of each standalone exit, and of the whole network at once
                network = load_model(Path(tmp) / f"seed{seed}" / "self_distilled")[0]
                shape = tuple(network.input_shape)
                parts = {name: exit_model(network, name) for name in EXITS}
                parts[WHOLE] = network
                latency = interleaved_latency(parts, shape, rounds=7)
                for name, part in parts.items():
                    costs[name] = {
                        "parameters": sum(p.numel() for p in part.parameters()),
                        "macs": macs(part, shape),
                        "latency_ms": latency[name],
                    }
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    def cell(key: str) -> str:
        return mean_std(acc[key]) if key in acc else "-"

    lines = [
        f"Command: `python benchmarks/self_distill.py --seeds {args.seeds}` "
        f"(recipes/digits_self_distill.yaml with {' '.join(BASE)})",
        "",
        f"Machine: {machine()}. Digits (all labels), seeds 0..{args.seeds - 1}, test accuracy "
        f"mean +- std; every model trained {BASE[2].split('=')[1]} epochs. "
        f"Total {time.perf_counter() - started:.0f} s.",
        "",
        "| exit | parameters | MACs | CPU latency (batch 1) | self-distilled "
        "| self-distilled + hints | deeply supervised | exit architecture alone (scratch) "
        "| plain KD from (c) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in EXITS:
        standalone = cell(f"{name}/standalone") if name != "final" else cell("scratch") + " (c)"
        lines.append(
            f"| {name} | {costs[name]['parameters']:,} | {costs[name]['macs']:,} "
            f"| {costs[name]['latency_ms']:.3f} ms "
            f"| {cell(f'{name}/self_distilled')} | {cell(f'{name}/self_distilled_hints')} "
            f"| {cell(f'{name}/deeply_supervised')} | {standalone} | {cell(f'{name}/plain_kd')} |"
        )
    whole = costs[WHOLE]
    lines += [
        "",
        f"The whole multi-exit network (every exit at once): {whole['parameters']:,} parameters, "
        f"{whole['macs']:,} MACs, {whole['latency_ms']:.3f} ms. Costs of the standalone exit "
        "networks of seed 0; latency: median over 7 interleaved rounds of the median of 100 "
        "single-sample forwards, one thread, on a shared machine (per-op overhead dominates at "
        "this size). "
        f"Hints: exit bottleneck maps -> last stage map, weight {HINT_WEIGHT}. Plain KD: the exit1 "
        "architecture trained alone, distilled (alpha 0.5, T 3) from the plain network (c).",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "self_distill.md").write_text(table)
    (args.out / "self_distill.json").write_text(
        json.dumps({"accuracy": acc, "costs": costs, "machine": machine()}, indent=2)
    )


if __name__ == "__main__":
    main()
