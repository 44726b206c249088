"""`SoftTargetStore`: read a store batch by batch, checking every byte it hands out.

Shards are .npy files memory-mapped read-only; a batch copies out only its rows. Integrity:
opening checks that every shard file exists with its recorded size (a truncated shard is named
at once); the first access to a shard hashes its files against the manifest (a flipped byte is
named before any row of that shard is returned); `verify()` hashes them all up front.

Memory stays flat however large the store: rows are copied out of the mapping, and the mapped
pages a batch touched are handed back to the kernel (madvise DONTNEED, they stay in the page
cache) once they could add up to `max_resident_bytes`, so the process never holds the store.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from torch import nn
from torch.utils.data import Dataset

from stillroom.data import ArrayData
from stillroom.errors import StillroomError
from stillroom.losses.topk import TopKTargets
from stillroom.store.fingerprint import (
    dataset_fingerprint,
    describe_differences,
    input_projections,
    mismatched_inputs,
    teacher_fingerprint,
)
from stillroom.store.manifest import SHARDS, Manifest, check_file, npy_header

# a page fault maps up to 16 neighbouring pages ("fault-around"): count 64 KiB per row touched
_RESIDENT_PER_ROW = 64 * 1024


class _MappedField:
    """One shard file, memory-mapped read-only, as an (n, ...) numpy array over the mapping."""

    def __init__(self, path: Path, count: int, spec: dict[str, Any]) -> None:
        shape, dtype, offset = npy_header(path)
        expected = (count, *spec["shape"])
        if shape != expected or dtype != np.dtype(spec["dtype"]):
            raise StillroomError(
                f"shard file {path} holds {dtype} {shape}, but the manifest says "
                f"{spec['dtype']} {expected}; the store is damaged"
            )
        with open(path, "rb") as handle:
            # an empty mapping is not allowed; a zero-row field never needs one
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if count else None
        self.array = (
            np.frombuffer(self.map, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(
                shape
            )
            if self.map is not None
            else np.empty(shape, dtype)
        )

    def release(self) -> None:
        # pages return to the page cache, not to disk: the next touch is a minor fault
        if self.map is not None and hasattr(mmap, "MADV_DONTNEED"):  # absent on Windows
            self.map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        del self.array
        if self.map is not None:
            self.map.close()


class SoftTargetStore:
    """A complete store on disk, read by sample id.

    Open with `SoftTargetStore.open(path)`; `read(field, ids)` returns those rows as numpy,
    `logits(ids)` / `topk(ids)` / `features(name, ids)` as tensors.
    """

    def __init__(
        self, path: Path, manifest: Manifest, max_resident_bytes: int = 256 * 2**20
    ) -> None:
        self.path, self.manifest = Path(path), manifest
        self.max_resident_bytes = max_resident_bytes
        self._fields: dict[int, dict[str, _MappedField]] = {}
        self._touched: set[int] = set()
        self._resident = 0
        self._codec = manifest.topk_codec()
        self._input_shape = tuple(manifest.dataset["input_shape"])

    @classmethod
    def open(
        cls, path: Path | str, *, verify: bool = False, max_resident_bytes: int = 256 * 2**20
    ) -> SoftTargetStore:
        """Open a complete store; every file's size is checked now, its sha256 on first use.

        verify: hash every shard now instead of on first use (reads the whole store once).
        max_resident_bytes: how much of the mapped store may stay in this process between
            releases back to the page cache.
        """
        path = Path(path)
        if not path.is_dir():
            raise StillroomError(f"store {path} does not exist; create it with `stillroom cache`")
        manifest = Manifest.load(path)
        if not manifest.complete:
            done = len(list((path / SHARDS).glob("*.json")))
            raise StillroomError(
                f"store {path} is incomplete ({done} of {manifest.num_shards} shards written); "
                "finish it with `stillroom cache ... --resume`"
            )
        store = cls(path, manifest, max_resident_bytes)
        for shard in manifest.shards:
            for entry in shard["files"].values():
                store._check(shard["index"], entry, hash_it=False)
        if verify:
            store.verify()
        return store

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def verify(self, progress: bool | None = None) -> None:
        """Hash every shard file against the manifest; raises naming the first bad one (and the
        command that recomputes it). progress: a bar on stderr (None: for stores over 1 GiB)."""
        entries = [(s["index"], e) for s in self.manifest.shards for e in s["files"].values()]
        total = sum(entry["bytes"] for _, entry in entries)
        show = total > 2**30 if progress is None else progress
        with Progress(
            TextColumn("verifying store"),
            BarColumn(),
            DownloadColumn(),
            console=Console(stderr=True),
            disable=not show,
            transient=True,
        ) as bar:
            task = bar.add_task("verify", total=total)
            for index, entry in entries:
                self._check(index, entry, hash_it=True)
                bar.update(task, advance=entry["bytes"])

    def _check(self, index: int, entry: dict[str, Any], hash_it: bool) -> None:
        path = self.path / SHARDS / entry["file"]
        problem = check_file(path, entry, hash_it)
        if problem is not None:
            raise StillroomError(
                f"store {self.path}: shard file {SHARDS}/{entry['file']} (shard {index}) {problem}; "
                "recompute it with `stillroom cache ... --resume` (only damaged shards are redone)"
            )

    def _shard(self, index: int) -> dict[str, _MappedField]:
        if index not in self._fields:
            shard = self.manifest.shards[index]
            for entry in shard["files"].values():
                self._check(index, entry, hash_it=True)
            self._fields[index] = {
                name: _MappedField(
                    self.path / SHARDS / entry["file"], shard["count"], self.manifest.fields[name]
                )
                for name, entry in shard["files"].items()
            }
        return self._fields[index]

    def read(self, field: str, ids: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
        """Rows `ids` of `field` as a new numpy array (B, *field shape), in the stored dtype."""
        return self.read_fields([field], ids)[field]

    def read_fields(
        self, fields: list[str], ids: np.ndarray | torch.Tensor | list[int]
    ) -> dict[str, np.ndarray]:
        """Rows `ids` of several fields at once (one shard lookup for all of them)."""
        unknown = [f for f in fields if f not in self.manifest.fields]
        if unknown:
            raise StillroomError(
                f"store {self.path} has no field {unknown[0]!r}; it holds "
                f"{', '.join(self.manifest.fields)}"
            )
        ids = _as_ids(ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise StillroomError(
                f"sample index {bad} is out of range: the store holds {len(self)} samples; the "
                "loader must index the dataset the store was computed on"
            )
        shard_of, row = np.divmod(ids, self.manifest.shard_size)
        first = int(shard_of[0]) if len(ids) else 0
        out: dict[str, np.ndarray] = {}
        if len(ids) and (shard_of == first).all():  # the common case: one shard, one gather
            mapped = self._shard(first)
            out = {field: mapped[field].array[row] for field in fields}
            self._touched.add(first)
        else:
            for field in fields:
                spec = self.manifest.fields[field]
                out[field] = np.empty((len(ids), *spec["shape"]), dtype=np.dtype(spec["dtype"]))
            for index in np.unique(shard_of):
                chosen, mapped = shard_of == index, self._shard(int(index))
                for field in fields:
                    out[field][chosen] = mapped[field].array[row[chosen]]
                self._touched.add(int(index))
        row_bytes = sum(array[:1].nbytes for array in out.values())
        self._resident += len(ids) * (row_bytes + len(fields) * _RESIDENT_PER_ROW)
        if self._resident > self.max_resident_bytes:
            self.release()
        return out

    def release(self) -> None:
        """Hand the mapped pages touched so far back to the page cache."""
        for index in self._touched:
            for mapped in self._fields[index].values():
                mapped.release()
        self._touched.clear()
        self._resident = 0

    def logits(self, ids: Any) -> torch.Tensor:
        """(B, *output_shape) float32 raw teacher logits of a dense store."""
        if self.kind != "dense":
            raise StillroomError(f"store {self.path} holds top-k targets; use topk(ids)")
        return torch.from_numpy(self.read("logits", ids)).float()

    def topk(self, ids: Any) -> TopKTargets:
        """`TopKTargets` (float32 log-probs, int64 ids, float32 tail mass) with k on the class dim."""
        if self._codec is None:
            raise StillroomError(f"store {self.path} holds dense logits; use logits(ids)")
        ids = _as_ids(ids)
        stored = self.read_fields(["topk_logprobs", "topk_indices", "topk_tail"], ids)
        positions = stored["topk_tail"].shape  # (B, *positions)
        flat = {
            name: a.reshape(int(np.prod(positions)), *a.shape[len(positions) :])
            for name, a in stored.items()
        }
        logprobs, indices, tail = self._codec.decode(flat)
        k, class_dim = self._codec.k, self.manifest.class_dim
        return TopKTargets(
            torch.from_numpy(logprobs).reshape(*positions, k).movedim(-1, class_dim),
            torch.from_numpy(indices).reshape(*positions, k).movedim(-1, class_dim),
            torch.from_numpy(tail).reshape(positions),
        )

    def features(self, name: str, ids: Any) -> torch.Tensor:
        """(B, ...) float32 outputs of the teacher's module `name`, stored with `features=`."""
        if name not in self.manifest.features:
            raise StillroomError(
                f"store {self.path} holds no features of {name!r}; it holds "
                f"{', '.join(self.manifest.features) or 'none'} (cache them with --features)"
            )
        return torch.from_numpy(self.read(f"feature.{name}", ids)).float()

    def check(
        self,
        teacher: nn.Module | None = None,
        data: torch.Tensor | ArrayData | Dataset | None = None,
    ) -> None:
        """Refuse a store made by another teacher or on another dataset, saying which differs."""
        problems = []
        if teacher is not None:
            given = teacher_fingerprint(teacher)
            stored = self.manifest.teacher
            if given["sha256"] != stored["sha256"]:
                problems.append(
                    f"by a different teacher (weights sha256 {stored['sha256'][:12]} in the store "
                    f"vs {given['sha256'][:12]} for the teacher given)"
                )
        if data is not None:
            keys = ("count", "input_shape", "input_dtype", "sample_sha256")
            diffs = describe_differences(self.manifest.dataset, dataset_fingerprint(data), keys)
            if diffs:
                problems.append("on a different dataset (" + "; ".join(diffs) + ")")
        if problems:
            raise StillroomError(
                f"store {self.path} was computed {' and '.join(problems)}; recompute it with "
                f"`stillroom cache` for this teacher and data (created by: {self.manifest.command})"
            )

    def check_inputs(
        self, inputs: torch.Tensor, ids: Any, stored: np.ndarray | None = None
    ) -> None:
        """Raise unless `inputs` are the very inputs the store holds for samples `ids`.

        stored: the (B, 2) "input_fingerprint" rows of `ids`, if already read.
        """
        ids = _as_ids(ids)
        if tuple(inputs.shape[1:]) != self._input_shape:
            raise StillroomError(
                f"batch inputs have shape {tuple(inputs.shape[1:])} per sample, but the store was "
                f"computed on inputs of shape {self._input_shape}"
            )
        if stored is None:
            stored = self.read("input_fingerprint", ids)
        off = mismatched_inputs(input_projections(inputs).numpy(), stored)
        if len(off):
            shown = ", ".join(str(i) for i in ids[off[:5]])
            raise StillroomError(
                f"the inputs of sample(s) {shown} ({len(off)} of {len(ids)} in this batch) differ "
                f"from those the store {self.path} was computed on (random augmentation? other "
                "preprocessing or dataset?); cached soft targets are valid only for the exact "
                "inputs they were computed on: train with a live teacher for augmented data"
            )

    def close(self) -> None:
        for fields in self._fields.values():
            for mapped in fields.values():
                mapped.close()
        self._fields.clear()

    def __enter__(self) -> SoftTargetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_ids(ids: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)
