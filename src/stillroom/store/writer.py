"""`cache_teacher`: run a frozen teacher once over a dataset and write its outputs to a store.

    data -> teacher (eval mode, inference mode, forward hooks on named modules)
         -> per shard: raw logits (dense) or top-k log-probs + ids + tail, features, input
            fingerprints -> one .npy per field, written atomically, then the shard's record
         -> manifest.json, complete

Raw logits, never softened: temperature is applied at training time, so one store serves every T.
A run killed at any point (kill -9) resumes with `resume=True`: shards whose record exists and
whose files still match it are kept, the rest are computed again.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.utils.data import Dataset

import stillroom
from stillroom.data import ArrayData
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.runs import hold, remove_folder, replaceable, write_marker
from stillroom.store.codec import TopKCodec, encode_topk, reconstruction_kl, topk_fidelity
from stillroom.store.fingerprint import (
    FINGERPRINT_ATOL,
    FINGERPRINT_RTOL,
    PROJECTION_SEED,
    InputSource,
    dataset_fingerprint,
    describe_differences,
    input_fingerprints,
    teacher_fingerprint,
)
from stillroom.store.manifest import (
    MANIFEST,
    SETTINGS,
    SHARDS,
    Manifest,
    auto_shard_size,
    check_file,
    read_record,
    record_file,
    shard_file,
    shard_problem,
    write_array,
)

PRECISIONS = ("fp32", "fp16", "q8")
FP16_MAX = float(np.finfo(np.float16).max)
FIDELITY_SAMPLE_POSITIONS = 4096


def cache_teacher(
    teacher: nn.Module,
    data: torch.Tensor | ArrayData | Dataset,
    out: Path | str,
    *,
    top_k: int | None = None,
    precision: str = "fp16",
    pack_indices: bool = False,
    features: Sequence[str] = (),
    class_dim: int = 1,
    shard_size: int | None = None,
    batch_size: int = 256,
    resume: bool = False,
    force: bool = False,
    device: torch.device | str | None = None,
    command: str = "python: stillroom.store.cache_teacher",
    progress: bool = True,
) -> Manifest:
    """Compute `teacher`'s outputs for every sample of `data` once and write them to store `out`.

    Args:
        teacher: the trained teacher; it is put in eval mode and never updated.
        data: the inputs, in the order the training loader indexes them: an (N, ...) tensor, an
            `ArrayData`, or a map-style Dataset (items: inputs, or (inputs, ...), or {"inputs"}).
        out: the store folder; an existing store is never replaced unless `force`.
        top_k: None for dense shards of raw logits; k to keep per position the k largest
            log-probabilities, their ids and the mass outside them (large vocabularies, dense
            predictions).
        precision: "fp16" or "fp32" for logits and features; "q8" (one byte per value, top-k only)
            quantises the top-k log-probabilities.
        pack_indices: top-k ids packed with Elias-Fano coding instead of the narrowest integer type.
        features: names from `teacher.named_modules()` whose outputs are stored too (dense).
        class_dim: the dim of the teacher's (N, ...) output that holds the classes (1 for (N, C)
            and (N, C, H, W), -1 for language models' (N, L, V)).
        shard_size: samples per shard (default: about 64 MiB per shard).
        batch_size: samples per teacher forward pass.
        resume: continue an interrupted store in `out` (same teacher, data and settings).
        force: replace an existing store in `out`.
        device: where the teacher runs (default: where its parameters are).
        command: the command that created the store, recorded in the manifest.
        progress: show a progress bar.

    Returns:
        the store's final manifest.
    """
    out = Path(out)
    _check_options(top_k, precision, pack_indices, batch_size, shard_size, resume, force)
    source = InputSource(data)
    previous = _existing_store(out, resume, force)  # checks only: nothing on disk changes yet
    if device is None:
        params = list(teacher.parameters())
        device = params[0].device if params else torch.device("cpu")
    # eval: dropout would make the stored targets noisy, batch-norm statistics would drift
    teacher = teacher.eval().to(device)

    with ExitStack() as stack:
        captured = _tap(teacher, features, stack)
        probe = _run(teacher, source.batch(0, 1), device, captured, class_dim)
        manifest = _new_manifest(
            teacher, source, probe, top_k, precision, pack_indices, features, class_dim, command
        )
        manifest.shard_size = shard_size or (
            previous.shard_size if previous else auto_shard_size(manifest.bytes_per_sample)
        )
        if previous is not None:
            _check_resumable(out, previous, manifest)
            manifest.created = previous.created
        elif force and out.exists():
            remove_folder(out, "store")  # only a stillroom store gets here (_existing_store)
        out.mkdir(parents=True, exist_ok=True)
        hold(out)
        write_marker(out, "store")
        manifest.save(out)
        codec = manifest.topk_codec()
        shards_dir = out / SHARDS
        shards_dir.mkdir(exist_ok=True)
        for stale in shards_dir.glob(".*.tmp-*"):  # left by a killed run; never read
            stale.unlink(missing_ok=True)

        records: dict[int, dict[str, Any]] = {}
        with _progress(progress) as bar:
            task = bar.add_task("cache", total=manifest.num_samples, status="")
            for index in range(manifest.num_shards):
                start, stop = manifest.shard_range(index)
                record = read_record(out, index) if previous is not None else None
                if record is not None and _shard_intact(out, record, index, manifest):
                    records[index] = record
                    bar.update(task, advance=stop - start, status=f"shard {index} kept")
                    continue
                records[index] = _write_shard(
                    teacher, source, manifest, codec, index, out, device, captured, batch_size
                )
                bar.update(task, advance=stop - start, status=f"shard {index} written")

    return _finish(out, manifest, records)


def _check_options(
    top_k: int | None,
    precision: str,
    pack_indices: bool,
    batch_size: int,
    shard_size: int | None,
    resume: bool,
    force: bool,
) -> None:
    if precision not in PRECISIONS:
        raise StillroomError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "q8" and top_k is None:
        raise StillroomError(
            "precision q8 quantises top-k log-probabilities; dense logits are stored as fp16 or "
            "fp32 (pass --top-k K, or --precision fp16)"
        )
    if pack_indices and top_k is None:
        raise StillroomError("packed indices need a top-k store (pass --top-k K)")
    if top_k is not None and top_k < 1:
        raise StillroomError(f"top-k must be >= 1, got {top_k}")
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise StillroomError("batch_size and shard_size must be >= 1")
    if resume and force:
        raise StillroomError("--resume and --force contradict each other; pass one")


def _existing_store(out: Path, resume: bool, force: bool) -> Manifest | None:
    """The manifest of the store to resume, or None to write a new one; never replaces silently."""
    if out.exists() and not out.is_dir():
        raise StillroomError(f"store folder {out} exists and is a file; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return None
    is_store = (out / MANIFEST).is_file()
    if resume:
        if not is_store:
            raise StillroomError(f"nothing to resume in {out}: it holds no {MANIFEST}")
        return Manifest.load(out)
    if not force:
        raise StillroomError(
            f"store folder {out} already exists; pass --resume to continue it, --force to replace "
            "it, or choose another --out"
        )
    if not is_store:
        raise StillroomError(
            f"--force only replaces a stillroom store, and {out} holds no {MANIFEST}; "
            "choose another --out"
        )
    replaceable(out, "store")  # a manifest.json alone may be the user's: the marker proves it
    return None


def _tap(teacher: nn.Module, names: Sequence[str], stack: ExitStack) -> dict[str, torch.Tensor]:
    """Forward hooks that put each named module's output into the returned dict on every call."""
    modules = dict(teacher.named_modules())
    captured: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in modules or name == "":
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
            hint = f"closest: {', '.join(close)}" if close else f"modules: {', '.join(valid[:12])}"
            raise StillroomError(
                f"the teacher has no module named {name!r} to capture features from; {hint}"
            )

        def hook(_module: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            # transformers' layers return (hidden_states, ...): the first element is the feature
            tensor = output[0] if isinstance(output, tuple | list) and output else output
            if not isinstance(tensor, torch.Tensor):
                raise StillroomError(
                    f"module {name!r} returns {type(output).__name__}, not a tensor; pick a module "
                    "whose output is a tensor"
                )
            captured[name] = tensor

        stack.callback(modules[name].register_forward_hook(hook).remove)
    return captured


def _run(
    teacher: nn.Module,
    inputs: torch.Tensor,
    device: torch.device | str,
    captured: dict[str, torch.Tensor],
    class_dim: int,
) -> dict[str, torch.Tensor]:
    """One forward pass in inference mode: {"logits": (B, ...), "feature.NAME": (B, ...)}."""
    captured.clear()
    with torch.inference_mode():
        logits = teacher(inputs.to(device))
    if not isinstance(logits, torch.Tensor):
        raise StillroomError(
            f"the teacher returns {type(logits).__name__}, not a tensor of logits; wrap it in a "
            "module whose forward returns the logits (e.g. model(x).logits)"
        )
    if logits.dim() < 2 or logits.shape[0] != len(inputs):
        raise StillroomError(
            f"the teacher's output {tuple(logits.shape)} has no batch dim of size {len(inputs)}"
        )
    if not -logits.dim() <= class_dim < logits.dim() or class_dim % logits.dim() == 0:
        raise StillroomError(
            f"class_dim={class_dim} is not a class dim of outputs shaped {tuple(logits.shape)}"
        )
    return {"logits": logits, **{f"feature.{n}": t for n, t in captured.items()}}


def _new_manifest(
    teacher: nn.Module,
    source: InputSource,
    probe: dict[str, torch.Tensor],
    top_k: int | None,
    precision: str,
    pack_indices: bool,
    features: Sequence[str],
    class_dim: int,
    command: str,
) -> Manifest:
    logits = probe["logits"]
    class_dim = class_dim % logits.dim()  # stored as a non-negative dim of the batched output
    num_classes = logits.shape[class_dim]
    float_dtype = "float32" if precision == "fp32" else "float16"
    fields: dict[str, dict[str, Any]] = {"input_fingerprint": {"dtype": "float32", "shape": [2]}}
    index_encoding = None
    if top_k is None:
        fields["logits"] = {"dtype": float_dtype, "shape": list(logits.shape[1:])}
    else:
        if top_k > num_classes:
            raise StillroomError(
                f"top-k {top_k} is larger than the teacher's {num_classes} classes; use at most "
                f"{num_classes}, or no top-k for a dense store"
            )
        index_encoding = "elias-fano" if pack_indices else "plain"
        positions = [s for d, s in enumerate(logits.shape) if d not in (0, class_dim)]
        codec = TopKCodec(num_classes, top_k, precision, index_encoding)
        for name, (dtype, shape) in codec.fields().items():
            fields[name] = {"dtype": dtype.name, "shape": positions + list(shape)}
    for name in features:
        fields[f"feature.{name}"] = {
            "dtype": float_dtype,
            "shape": list(probe[f"feature.{name}"].shape[1:]),
        }
    manifest = Manifest(
        kind="dense" if top_k is None else "topk",
        num_samples=len(source),
        shard_size=1,
        output_shape=list(logits.shape[1:]),
        class_dim=class_dim,
        precision=precision,
        top_k=top_k,
        index_encoding=index_encoding,
        features=list(features),
        fields=fields,
        teacher=teacher_fingerprint(teacher),
        dataset=dataset_fingerprint(source),
        input_fingerprint={
            "method": "x.flatten(1).float() projected on a unit randn vector, and its L2 norm",
            "seed": PROJECTION_SEED,
            "rtol": FINGERPRINT_RTOL,
            "atol": FINGERPRINT_ATOL,
        },
        command=command,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        stillroom_version=stillroom.__version__,
    )
    manifest.bytes_per_sample = float(
        sum(np.dtype(f["dtype"]).itemsize * int(np.prod(f["shape"])) for f in fields.values())
    )
    return manifest


def _check_resumable(out: Path, previous: Manifest, current: Manifest) -> None:
    """Refuse to mix shards of different teachers, datasets or settings in one store."""
    problems = []
    if previous.teacher["sha256"] != current.teacher["sha256"]:
        problems.append(
            "the teacher differs (weights sha256 "
            f"{previous.teacher['sha256'][:12]} in the store vs {current.teacher['sha256'][:12]})"
        )
    data_keys = ("count", "input_shape", "input_dtype", "sample_sha256")
    data_diffs = describe_differences(previous.dataset, current.dataset, data_keys)
    if data_diffs:
        problems.append("the dataset differs (" + "; ".join(data_diffs) + ")")
    setting_diffs = describe_differences(previous.settings(), current.settings(), list(SETTINGS))
    if setting_diffs:
        problems.append("the settings differ (" + "; ".join(setting_diffs) + ")")
    if problems:
        raise StillroomError(
            f"cannot resume the store in {out}: " + "; ".join(problems) + ". Resume with the same "
            "teacher, data and options, or pass --force to replace the store"
        )


def _shard_intact(out: Path, record: Any, index: int, manifest: Manifest) -> bool:
    # a record naming other files (edited, or crafted to point outside the store) is redone
    if shard_problem(record, index, manifest) is not None:
        return False
    return all(
        check_file(out / SHARDS / entry["file"], entry, hash_it=True) is None
        for entry in record["files"].values()
    )


def _write_shard(
    teacher: nn.Module,
    source: InputSource,
    manifest: Manifest,
    codec: TopKCodec | None,
    index: int,
    out: Path,
    device: torch.device | str,
    captured: dict[str, torch.Tensor],
    batch_size: int,
) -> dict[str, Any]:
    """Compute one shard, write its .npy files, then its record (the commit point)."""
    started = time.perf_counter()
    start, stop = manifest.shard_range(index)
    arrays = {
        name: np.empty((stop - start, *spec["shape"]), dtype=np.dtype(spec["dtype"]))
        for name, spec in manifest.fields.items()
    }
    stats = {"kl_sum": 0.0, "tail_sum": 0.0, "positions": 0}
    table = None
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        inputs = source.batch(lo, hi).to(device)
        outputs = _run(teacher, inputs, device, captured, manifest.class_dim)
        rows = slice(lo - start, hi - start)
        arrays["input_fingerprint"][rows] = input_fingerprints(inputs).numpy()
        for name, tensor in outputs.items():
            _check_finite(tensor, name, lo, hi, manifest.precision)
            if name == "logits" and codec is not None:
                for key, value in encode_topk(tensor.float(), codec, manifest.class_dim).items():
                    arrays[key][rows] = value
                if index == 0 and lo == start:
                    table = _fidelity_table(tensor, codec, manifest.class_dim)
                kl, tail = reconstruction_kl(tensor, codec, manifest.class_dim)
                stats["kl_sum"] += kl.sum().item()
                stats["tail_sum"] += tail.sum().item()
                stats["positions"] += kl.numel()
            else:
                arrays[name][rows] = tensor.detach().float().cpu().numpy()
    files = {
        name: write_array(out / SHARDS / shard_file(index, name), array)
        for name, array in arrays.items()
    }
    record = {
        "index": index,
        "start": start,
        "count": stop - start,
        "files": files,
        "seconds": time.perf_counter() - started,
        **(stats if codec is not None else {}),
        **({"fidelity_table": table} if table is not None else {}),
    }
    atomic_write_json(out / SHARDS / record_file(index), record)
    return record


def _check_finite(tensor: torch.Tensor, name: str, lo: int, hi: int, precision: str) -> None:
    if not torch.isfinite(tensor).all():
        raise StillroomError(
            f"the teacher's {name} for samples {lo}..{hi - 1} hold NaN or inf; check the teacher "
            "and the inputs"
        )
    if precision != "fp32" and tensor.abs().max().item() > FP16_MAX:
        raise StillroomError(
            f"the teacher's {name} for samples {lo}..{hi - 1} exceed fp16's range "
            f"({tensor.abs().max().item():.3g} > {FP16_MAX:.0f}); use --precision fp32"
        )


def _fidelity_table(
    logits: torch.Tensor, codec: TopKCodec, class_dim: int
) -> list[dict[str, float]]:
    """KL(full || reconstruction) and bytes per position for a few k around the chosen one."""
    vocab = codec.num_classes
    ks = sorted({max(1, codec.k // 4), max(1, codec.k // 2), codec.k, min(vocab, 2 * codec.k)})
    flat = logits.detach().float().movedim(class_dim, -1).reshape(-1, vocab)
    return topk_fidelity(flat[:FIDELITY_SAMPLE_POSITIONS], ks, -1, codec.values, codec.indices)


def _finish(out: Path, manifest: Manifest, records: dict[int, dict[str, Any]]) -> Manifest:
    ordered = [records[i] for i in range(manifest.num_shards)]
    manifest.shards = [
        {key: r[key] for key in ("index", "start", "count", "files")} for r in ordered
    ]
    seconds = sum(r["seconds"] for r in ordered)
    manifest.generation = {
        "seconds": round(seconds, 3),
        "samples_per_second": round(manifest.num_samples / seconds, 1) if seconds > 0 else None,
    }
    if manifest.kind == "topk":
        positions = sum(r["positions"] for r in ordered)
        table = ordered[0].get("fidelity_table")
        manifest.fidelity = {
            "k": manifest.top_k,
            "positions": positions,
            "kl_mean": sum(r["kl_sum"] for r in ordered) / max(positions, 1),
            "tail_mass_mean": sum(r["tail_sum"] for r in ordered) / max(positions, 1),
            "bytes_per_position": manifest.topk_codec().bytes_per_position,  # type: ignore[union-attr]
            "by_k": table,
            "by_k_positions": min(FIDELITY_SAMPLE_POSITIONS, positions),
        }
    manifest.complete = True
    manifest.save(out)
    return manifest


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
        transient=False,
    )
