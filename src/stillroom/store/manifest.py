"""The store's manifest and shard files: what was cached, from what, and how to check it.

Store folder:
    manifest.json            settings, fingerprints, shapes, the creation command, and per shard
                             its files with their sizes and sha256 (the complete list at the end)
    shards/NNNNN.json        a shard's record, written last: a shard is complete when this exists
                             and its files match it (what `--resume` relies on)
    shards/NNNNN.FIELD.npy   one .npy per field and shard: fixed-size rows, memory-mappable
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.errors import StillroomError
from stillroom.io import atomic_write, atomic_write_json
from stillroom.store.codec import TopKCodec

FORMAT = "stillroom-store"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"

SETTINGS = (
    "kind",
    "num_samples",
    "shard_size",
    "output_shape",
    "class_dim",
    "precision",
    "top_k",
    "index_encoding",
    "features",
)
"""Manifest keys that must match for `--resume` to continue a store (with the fingerprints)."""


@dataclass
class Manifest:
    """Everything a reader needs to interpret a store, and to refuse one that does not fit.

    fields: per stored field, its dtype and per-sample shape, e.g.
        {"logits": {"dtype": "float16", "shape": [10]}}.
    shards: per shard {"index", "start", "count", "files": {field: {"file", "bytes", "sha256"}}},
        complete only once `complete` is true.
    """

    kind: str
    num_samples: int
    shard_size: int
    output_shape: list[int]
    class_dim: int
    precision: str
    top_k: int | None
    index_encoding: str | None
    features: list[str]
    fields: dict[str, dict[str, Any]]
    teacher: dict[str, Any]
    dataset: dict[str, Any]
    input_fingerprint: dict[str, Any]
    command: str
    created: str
    stillroom_version: str
    complete: bool = False
    shards: list[dict[str, Any]] = field(default_factory=list)
    bytes_per_sample: float = 0.0
    fidelity: dict[str, Any] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_samples / self.shard_size))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def topk_codec(self) -> TopKCodec | None:
        """The top-k encoding of a top-k store; None for a dense one."""
        if self.kind != "topk":
            return None
        assert self.top_k is not None and self.index_encoding is not None
        num_classes = self.output_shape[self.class_dim - 1]  # class_dim counts the batch dim
        return TopKCodec(num_classes, self.top_k, self.precision, self.index_encoding)

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    def save(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise StillroomError(
                f"{folder} is not a stillroom store: it holds no {MANIFEST} (create one with "
                "`stillroom cache`)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StillroomError(
                f"{path} is not valid JSON ({err}); the store is damaged"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StillroomError(f"{path} is not a stillroom store manifest")
        if data.get("version") != VERSION:
            raise StillroomError(
                f"{path} has store format version {data.get('version')}; this stillroom reads "
                f"version {VERSION}: recreate the store with `stillroom cache`"
            )
        try:
            return cls(**data)
        except TypeError as err:
            raise StillroomError(f"{path} is missing or has unknown keys ({err})") from None


def shard_file(index: int, name: str) -> str:
    return f"{index:05d}.{name}.npy"


def record_file(index: int) -> str:
    return f"{index:05d}.json"


def auto_shard_size(bytes_per_sample: float, target_bytes: int = 64 * 2**20) -> int:
    """Samples per shard so that one shard's files add up to about `target_bytes` (64 MiB)."""
    return max(1, math.floor(target_bytes / max(bytes_per_sample, 1.0)))


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (np.lib.format writes into it)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.handle.write(data)


def write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write `array` as .npy atomically; returns its {"file", "bytes", "sha256"} record."""
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            writer = _HashingWriter(handle)
            np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
        result.update(file=path.name, bytes=writer.size, sha256=writer.digest.hexdigest())

    atomic_write(path, write)
    return result


def file_sha256(path: Path) -> str:
    # hashlib.file_digest reads in chunks: constant memory, and nothing is mapped into the process
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_file(path: Path, record: dict[str, Any], hash_it: bool) -> str | None:
    """None if `path` matches its record, else what is wrong with it (missing/truncated/corrupted)."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        kind = "truncated" if size < record["bytes"] else "longer than recorded"
        return f"is {kind} ({size:,} bytes, expected {record['bytes']:,})"
    if hash_it and file_sha256(path) != record["sha256"]:
        return "is corrupted (its sha256 does not match the manifest)"
    return None


def read_record(folder: Path, index: int) -> dict[str, Any] | None:
    """The shard's record if its JSON exists and parses, else None (not complete)."""
    path = Path(folder) / SHARDS / record_file(index)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, without reading the data."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        except ValueError as err:
            raise StillroomError(f"{path} has a damaged .npy header ({err})") from None
        # never object arrays: reading one would need pickle
        if fortran or dtype.hasobject:
            raise StillroomError(f"{path} is not a C-ordered numeric array")
        return shape, dtype, handle.tell()
