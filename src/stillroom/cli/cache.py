"""`stillroom cache RECIPE --out STORE`: run the recipe's trained teacher once over its training
data and write the soft-target store that students then train from (`stillroom.store`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from stillroom.cli.common import (
    OverridesArg,
    ProgressOption,
    ThreadsOption,
    console,
    with_threads,
)
from stillroom.config import load_recipe
from stillroom.errors import StillroomError


def cache_command(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="YAML recipe; its teacher (teacher.checkpoint, or an onnx / sklearn teacher.path) is cached"
        ),
    ],
    overrides: OverridesArg = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="store folder to create (required)")
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            help="keep the K most likely classes per position plus the mass outside them "
            "(large vocabularies, dense predictions); default: every logit",
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp16 or fp32 for logits and features; q8 (top-k only) stores each top-k "
            "log-probability in one byte",
        ),
    ] = "fp16",
    pack_indices: Annotated[
        bool,
        typer.Option("--pack-indices", help="pack top-k class ids with Elias-Fano coding"),
    ] = False,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="comma-separated teacher module names (as in named_modules()) whose outputs "
            "are stored too, e.g. features.3,head.1",
        ),
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option("--shard-size", help="samples per shard (default: ~64 MiB)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="samples per forward")] = 256,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an interrupted store in --out")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing store")] = False,
    progress: ProgressOption = True,
    threads: ThreadsOption = None,
) -> None:
    """Cache the teacher's outputs on the training data: compute them once, train many students."""
    import torch

    from stillroom.models import FROZEN, Standardized
    from stillroom.pipeline import given_teacher, prepare_data
    from stillroom.store import cache_teacher
    from stillroom.threads import use_threads

    resolved = load_recipe(recipe, with_threads(overrides, threads))
    use_threads(resolved.threads)
    if out is None:
        raise StillroomError("pass --out STORE_DIR: the folder the store is written to")
    section = resolved.teacher
    if section.checkpoint is None and section.kind not in FROZEN:
        raise StillroomError(
            "stillroom cache needs a trained teacher: set teacher.checkpoint to a folder with "
            "model.json + model.safetensors, e.g. teacher.checkpoint=runs/digits/teacher, or "
            "teacher.kind onnx / sklearn with teacher.path"
        )
    splits, train = prepare_data(resolved)  # the training split the student sees, labels or not
    given = given_teacher(resolved, splits)  # checked against the data: one line if it does not fit
    assert given is not None
    teacher, meta = given
    if section.kind in FROZEN and meta.get("preprocess"):
        # another framework's model reads the user's units; the store holds what the students
        # train on (standardised inputs), as `distill` reads the teacher back (load_model)
        teacher = Standardized(teacher, meta["preprocess"])
    device = "cuda" if torch.cuda.is_available() and not resolved.cpu else "cpu"
    manifest = cache_teacher(
        teacher,
        train,
        out,
        top_k=top_k,
        precision=precision,
        pack_indices=pack_indices,
        features=[name.strip() for name in features.split(",") if name.strip()] if features else [],
        shard_size=shard_size,
        batch_size=batch_size,
        resume=resume,
        force=force,
        device=device,
        command=shlex.join(["stillroom", *sys.argv[1:]]),
        progress=progress,
    )
    total = sum(entry["bytes"] for s in manifest.shards for entry in s["files"].values())
    rate = manifest.generation["samples_per_second"]
    console.print(
        f"store {out}: {manifest.num_samples:,} samples in {manifest.num_shards} shard(s), "
        f"{total / 2**20:.2f} MiB ({manifest.bytes_per_sample:,.0f} bytes/sample), "
        f"{manifest.kind} {manifest.precision}" + (f", {rate:,.0f} samples/s" if rate else ""),
        highlight=False,
        soft_wrap=True,
    )
    if manifest.fidelity is not None:
        console.print(
            f"top-{manifest.top_k}: KL(full || stored) {manifest.fidelity['kl_mean']:.3g} nats per "
            f"position on average; {manifest.fidelity['bytes_per_position']} bytes per position",
            highlight=False,
            soft_wrap=True,
        )
        for row in manifest.fidelity["by_k"] or []:
            console.print(
                f"  k={row['k']:>5}: {row['bytes_per_position']:>6} bytes/position, "
                f"KL {row['kl_mean']:.3g} (p99 {row['kl_p99']:.3g}), tail mass "
                f"{row['tail_mass_mean']:.3g}",
                highlight=False,
                soft_wrap=True,
            )
    console.print(f"manifest: {out / 'manifest.json'}", highlight=False, soft_wrap=True)
