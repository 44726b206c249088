"""The loop's overhead: seconds per epoch of stillroom's `distill` against a bare PyTorch loop
doing the same arithmetic, in three modes, with 1 and 2 threads.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --threads 1 2 --reps 4

Setting (issue 17's): 60,000 samples of 784 features (random inputs with labels from a fixed
random linear map: timing does not depend on what is learnt), teacher 784-1200-1200-10, student
784-64-10, SGD lr 0.05 momentum 0.9 (no Nesterov, both sides), batch 128, T = 4, alpha 0.9, one epoch per measurement.
Modes:
    labels  the student on labels alone (no teacher)
    online  KD with the live teacher run on every batch
    cached  KD from logits computed once, held in memory (stillroom: CachedTeacher)
    store   (stillroom only) KD from the soft-target store on disk; its ratio is to `cached` bare
The bare loop gathers each batch by index from in-memory tensors (a seeded randperm per epoch),
computes the same loss (`alpha * T^2 * KL + (1 - alpha) * CE`) and steps; stillroom runs
`stillroom.train.distill` with progress off, no validation, no run folder (its setup: the
Accelerator, prepare, the objective, is inside the timed epoch, as a user pays it). Each repetition times
every configuration back to back (interleaved), ratios are taken within a repetition, then the
median over repetitions. Writes benchmarks/results/overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import machine
from stillroom.data import ArrayData, make_loader
from stillroom.store import StoreTeacher, cache_teacher
from stillroom.teachers import CachedTeacher
from stillroom.train import TrainArgs, distill

RESULTS = Path(__file__).parent / "results"
N, FEATURES, CLASSES, BATCH, T, ALPHA, LR = 60_000, 784, 10, 128, 4.0, 0.9, 0.05


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def data(n: int) -> ArrayData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEATURES, generator=gen)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=gen)).argmax(1)
    return ArrayData(x, y, "classification", CLASSES, "synthetic")


def bare_epoch(student: nn.Module, train: ArrayData, teacher: nn.Module | None, logits) -> float:
    """One epoch of the plainest loop that computes the same loss."""
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    n = len(train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        index = order[i : i + BATCH]
        # index_select: several times faster than x[index] on the CPU (stillroom's loader uses it)
        x, y = train.inputs.index_select(0, index), train.targets.index_select(0, index)
        out = student(x)
        loss = F.cross_entropy(out, y)
        if teacher is not None or logits is not None:
            if logits is not None:
                soft = logits.index_select(0, index)
            else:
                with torch.no_grad():
                    soft = teacher(x)
            kd = F.kl_div(
                F.log_softmax(out / T, 1), F.log_softmax(soft / T, 1), log_target=True,
                reduction="batchmean",
            ) * T**2  # fmt: skip
            loss = ALPHA * kd + (1 - ALPHA) * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def stillroom_epoch(student: nn.Module, train: ArrayData, teacher) -> float:
    args = TrainArgs(
        epochs=1, lr=LR, optimizer="sgd", scheduler="constant", alpha=ALPHA if teacher else 0.0,
        temperature=T, weight_decay=0.0, nesterov=False, progress=False, cpu=True,
    )  # fmt: skip
    loader = make_loader(train, BATCH, shuffle=True)
    start = time.perf_counter()
    distill(teacher, student, loader, None, args=args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=N, help="smaller for a quick check")
    args = parser.parse_args()
    train = data(args.samples)
    torch.manual_seed(0)
    teacher = mlp(FEATURES, 1200, 1200, CLASSES).eval()
    with torch.no_grad():
        logits = torch.cat([teacher(x) for x in train.inputs.split(4096)])
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_teacher(teacher, train, Path(tmp) / "store", progress=False)
        store = StoreTeacher(Path(tmp) / "store")
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {}
            for _ in range(args.reps):
                runs = {
                    "labels/bare": lambda: bare_epoch(mlp(FEATURES, 64, CLASSES), train, None, None),
                    "labels/stillroom": lambda: stillroom_epoch(mlp(FEATURES, 64, CLASSES), train, None),
                    "online/bare": lambda: bare_epoch(mlp(FEATURES, 64, CLASSES), train, teacher, None),
                    "online/stillroom": lambda: stillroom_epoch(mlp(FEATURES, 64, CLASSES), train, teacher),
                    "cached/bare": lambda: bare_epoch(mlp(FEATURES, 64, CLASSES), train, None, logits),
                    "cached/stillroom": lambda: stillroom_epoch(
                        mlp(FEATURES, 64, CLASSES), train, CachedTeacher(logits)
                    ),
                    "store/stillroom": lambda: stillroom_epoch(mlp(FEATURES, 64, CLASSES), train, store),
                }  # fmt: skip
                for name, run in runs.items():
                    times.setdefault(name, []).append(run())
            ratio = {
                mode: statistics.median(
                    s / b
                    for s, b in zip(
                        times[f"{mode}/stillroom"],
                        times[f"{'cached' if mode == 'store' else mode}/bare"],
                        strict=True,
                    )
                )
                for mode in ("labels", "online", "cached", "store")
            }
            tables[threads] = {
                "median_s": {k: statistics.median(v) for k, v in times.items()},
                "ratio": ratio,
                "times": times,
            }
            print(threads, json.dumps(tables[threads]["ratio"]), flush=True)
    record = {"machine": machine(), "reps": args.reps, "threads": tables}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# Loop overhead: stillroom vs a bare PyTorch loop (s/epoch, {args.samples:,} x 784, "
        "batch 128)",
        "",
        f"`python benchmarks/overhead.py --threads {' '.join(map(str, args.threads))} --reps "
        f"{args.reps}` on {record['machine']}; medians of {args.reps} interleaved repetitions.",
        "",
        "| threads | mode | bare | stillroom | stillroom / bare |",
        "|---|---|---|---|---|",
    ]
    for threads, table in tables.items():
        med = table["median_s"]
        for mode in ("labels", "online", "cached", "store"):
            bare = med[f"{'cached' if mode == 'store' else mode}/bare"]
            lines.append(
                f"| {threads} | {mode} | {bare:.3f} | {med[f'{mode}/stillroom']:.3f} | "
                f"{table['ratio'][mode]:.2f} |"
            )
    (RESULTS / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
