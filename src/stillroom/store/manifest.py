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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.errors import StillroomError
from stillroom.io import atomic_write, atomic_write_json
from stillroom.store.codec import INDEX_ENCODINGS, VALUE_ENCODINGS, TopKCodec

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
            manifest = cls(**data)
        except TypeError as err:
            raise StillroomError(f"{path} is missing or has unknown keys ({err})") from None
        problem = manifest.problem()
        if problem is not None:
            raise StillroomError(
                f"{path}: {problem[:300]}; the store is damaged or was edited: recreate it with "
                "`stillroom cache` (or `stillroom cache ... --resume` for damaged shards)"
            )
        return manifest

    def problem(self) -> str | None:
        """What makes this manifest unreadable (a wrong type, a shard file named outside the
        store's shards/ folder), or None. Checked on load, before any shard is opened."""
        if self.kind not in ("dense", "topk"):
            return f"kind must be dense or topk, got {self.kind!r}"
        if not _whole(self.num_samples, 0, 2**40):
            return f"num_samples must be a whole number >= 0, got {self.num_samples!r}"
        if not _whole(self.shard_size, 1, 2**40):
            return f"shard_size must be a whole number >= 1, got {self.shard_size!r}"
        if not _sizes(self.output_shape, 1) or not 1 <= len(self.output_shape) <= 8:
            return f"output_shape must be a list of positive sizes, got {self.output_shape!r}"
        if not _whole(self.class_dim, 1, len(self.output_shape)):
            return f"class_dim must be 1 to {len(self.output_shape)}, got {self.class_dim!r}"
        if self.kind == "topk":
            if not _whole(self.top_k, 1, self.output_shape[self.class_dim - 1]):
                return f"a topk store needs top_k from 1 to the classes, got {self.top_k!r}"
            if self.precision not in VALUE_ENCODINGS or self.index_encoding not in INDEX_ENCODINGS:
                return (
                    f"a topk store needs precision in {VALUE_ENCODINGS} and index_encoding in "
                    f"{INDEX_ENCODINGS}, got {self.precision!r}, {self.index_encoding!r}"
                )
        elif self.top_k is not None or self.index_encoding is not None:
            return "a dense store has no top_k or index_encoding"
        elif self.precision not in ("fp16", "fp32"):
            return f"a dense store's precision must be fp16 or fp32, got {self.precision!r}"
        if not isinstance(self.features, list) or not all(
            isinstance(f, str) for f in self.features
        ):
            return "features must be a list of layer names"
        if not isinstance(self.fields, dict) or not self.fields:
            return "fields must map each stored field to its dtype and shape"
        for name, spec in self.fields.items():
            if not isinstance(spec, dict) or not _sizes(spec.get("shape"), 0):
                return f"field {name!r} needs a shape (a list of sizes)"
            try:
                dtype = np.dtype(spec.get("dtype"))
            except (TypeError, ValueError):
                return f"field {name!r} has dtype {str(spec.get('dtype'))[:40]!r}, not a dtype"
            if dtype.hasobject or dtype.kind not in "biuf":
                return f"field {name!r} has dtype {dtype}, not a numeric dtype"
        if not isinstance(self.teacher, dict) or not isinstance(self.teacher.get("sha256"), str):
            return "teacher must record the teacher's weights sha256"
        if not isinstance(self.dataset, dict) or not _sizes(self.dataset.get("input_shape"), 0):
            return "dataset must record the input_shape"
        if not isinstance(self.complete, bool) or not isinstance(self.shards, list):
            return "complete must be true or false, shards a list"
        if self.complete and len(self.shards) != self.num_shards:
            return f"a complete store lists {self.num_shards} shards, this one {len(self.shards)}"
        for index, shard in enumerate(self.shards):
            problem = shard_problem(shard, index, self)
            if problem is not None:
                return problem
        return None


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _sizes(value: Any, low: int) -> bool:
    return isinstance(value, list) and all(_whole(v, low, 2**40) for v in value)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_problem(shard: Any, index: int, manifest: Manifest) -> str | None:
    """What is wrong with shard `index`'s entry (in the manifest, or its shards/NNNNN.json
    record), or None. Its files must be exactly the names stillroom gives them: a crafted name
    (a path, `..`) would read a file outside the store."""
    if not isinstance(shard, dict):
        return f"shard {index} is not a mapping"
    start, end = manifest.shard_range(index)
    if (
        shard.get("index") != index
        or shard.get("start") != start
        or shard.get("count") != (end - start)
    ):
        return f"shard {index} does not cover samples {start}..{end} (index, start, count)"
    files = shard.get("files")
    if not isinstance(files, dict) or set(files) != set(manifest.fields):
        return f"shard {index} must list a file for each field ({', '.join(manifest.fields)})"
    for name, entry in files.items():
        if not isinstance(entry, dict) or entry.get("file") != shard_file(index, name):
            return f"shard {index}'s {name} file must be named {shard_file(index, name)}"
        if not _whole(entry.get("bytes"), 0, 2**50) or not (
            isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
        ):
            return f"shard {index}'s {name} file needs its bytes and sha256"
    return None


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
    if path.is_symlink():  # a link could point anywhere on the machine
        return "is a symbolic link (a store holds plain files)"
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
