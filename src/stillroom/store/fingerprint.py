"""Fingerprints that tie a store to the teacher, the dataset and the exact inputs it was computed on.

- teacher: sha256 of every state_dict tensor (names, dtypes, shapes, bytes): any weight or
  batch-norm statistic that changes the outputs changes the hash. A teacher from another framework
  (an ONNX graph, a skops estimator) keeps its weights in its file: its hash is the file's sha256.
- dataset: sample count, input shape and dtype, and sha256 of a fixed, evenly spaced sample of
  inputs; cheap enough to check each time a store is opened for training.
- per sample: the input's projection on a fixed seeded random unit vector and its L2 norm (two
  float32 per sample). The projection, recomputed for every training batch (one matrix-vector
  product), catches inputs that differ from the cached ones, e.g. random augmentation, for which
  cached soft targets would be silently wrong; the norm sets the tolerance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from stillroom.data import ArrayData
from stillroom.data.mapped import MappedInputs
from stillroom.errors import StillroomError
from stillroom.models import count_parameters
from stillroom.models.external import OnnxModule, SklearnModule

PROJECTION_SEED = 20150309  # fixed forever: stored fingerprints depend on it
FINGERPRINT_RTOL = 1e-4
"""Allowed |difference| of a sample's projection or norm, relative to its norm. Float32 rounding on
another device or batch size stays below ~1e-6; augmentations move them by far more."""
FINGERPRINT_ATOL = 1e-6
DATASET_SAMPLE_SIZE = 64


class InputSource:
    """Read-only access to the inputs of a dataset, by index and by contiguous range.

    Accepts an (N, ...) tensor, an `ArrayData`, or a map-style `Dataset` whose items are the inputs
    or a tuple/list/dict holding them first / under "inputs" (as stillroom's `IndexedDataset`).
    """

    def __init__(self, data: torch.Tensor | ArrayData | Dataset) -> None:
        if isinstance(data, ArrayData):
            data = data.inputs
        # inputs mapped from disk index like a tensor: a batch read is one read of those rows
        rows = isinstance(data, torch.Tensor | MappedInputs)
        self.tensor = data if rows else None
        self.dataset = None if rows else data
        if self.dataset is not None:
            try:
                len(self.dataset)  # type: ignore[arg-type]
            except TypeError:
                raise StillroomError(
                    "the dataset to cache must have a length (a map-style Dataset)"
                ) from None

    def __len__(self) -> int:
        return len(self.tensor) if self.tensor is not None else len(self.dataset)  # type: ignore[arg-type]

    def item(self, i: int) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[i]
        item = self.dataset[i]  # type: ignore[index]
        if isinstance(item, dict):
            item = item["inputs"]
        elif isinstance(item, tuple | list):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise StillroomError(
                f"dataset item {i} holds inputs of type {type(item).__name__}; expected a tensor"
            )
        return item

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[start:stop]
        return torch.stack([self.item(i) for i in range(start, stop)])


def teacher_fingerprint(module: nn.Module) -> dict[str, Any]:
    """sha256 over the teacher's state_dict (sorted by name), with its class and parameter count.

    A teacher whose weights live in another framework's file (OnnxModule, SklearnModule, also
    inside a wrapper such as `Standardized`) has no tensors of ours that could tell two teachers
    apart: its sha256 is that of the .onnx / .skops file (of the file hashes and the state_dict
    when there are several files or tensors beside it), and "files" names them.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    paths = sorted(
        {m.path.resolve() for m in module.modules() if isinstance(m, OnnxModule | SklearnModule)}
    )
    files = {str(path): file_sha256(path) for path in paths}
    if len(files) == 1 and not state:
        sha256 = next(iter(files.values()))
    else:
        for path, file_hash in files.items():
            digest.update(f"file|{path}|{file_hash}|".encode())
        sha256 = digest.hexdigest()
    fingerprint = {
        "sha256": sha256,
        "class": type(module).__name__,
        "parameters": count_parameters(module),
    }
    return {**fingerprint, "files": files} if files else fingerprint


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(data: torch.Tensor | ArrayData | Dataset | InputSource) -> dict[str, Any]:
    """Count, input shape/dtype and the sha256 of up to 64 evenly spaced inputs."""
    source = data if isinstance(data, InputSource) else InputSource(data)
    n = len(source)
    if n == 0:
        raise StillroomError("the dataset to cache has no samples")
    first = source.item(0)
    picks = sorted({round(x) for x in np.linspace(0, n - 1, min(n, DATASET_SAMPLE_SIZE))})
    digest = hashlib.sha256()
    for i in picks:
        flat = source.item(i).detach().cpu().contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return {
        "count": n,
        "input_shape": list(first.shape),
        "input_dtype": str(first.dtype).removeprefix("torch."),
        "sample_sha256": digest.hexdigest(),
        "sample_size": len(picks),
    }


_PROJECTIONS: dict[tuple[int, str], torch.Tensor] = {}


def _projection(dim: int, device: torch.device) -> torch.Tensor:
    key = (dim, str(device))
    if key not in _PROJECTIONS:
        gen = torch.Generator().manual_seed(PROJECTION_SEED)
        vector = torch.randn(dim, generator=gen, dtype=torch.float32)
        _PROJECTIONS[key] = (vector / vector.norm()).to(device)
    return _PROJECTIONS[key]


def input_projections(inputs: torch.Tensor) -> torch.Tensor:
    """(B, ...) inputs -> (B,) float32 on the CPU: each input projected on a seeded unit vector."""
    flat = inputs.detach().flatten(1).float()
    vector = _projection(flat.shape[1], flat.device)
    # on a GPU multiply and sum, not a matmul: TF32 matmuls would lose ~1e-3 of precision
    proj = flat @ vector if flat.device.type == "cpu" else (flat * vector).sum(dim=1)
    return proj.cpu()


def input_fingerprints(inputs: torch.Tensor) -> torch.Tensor:
    """(B, ...) inputs -> (B, 2) float32 on the CPU: the projection and the input's L2 norm.

    The stored norm scales the tolerance of later checks, which only recompute the projection:
    a random unit direction sees any change of the input (noise, flips, crops, scaling) unless
    the change happens to be orthogonal to it, which for a fresh augmentation it almost never is.
    """
    norm = torch.linalg.vector_norm(inputs.detach().flatten(1).float(), dim=1).cpu()
    return torch.stack([input_projections(inputs), norm], dim=1)


def mismatched_inputs(projections: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Rows whose (B,) projection differs from the stored (B, 2) fingerprint beyond tolerance."""
    tolerance = FINGERPRINT_RTOL * np.abs(stored[:, 1]) + FINGERPRINT_ATOL
    # `not <=` rather than `>`: a NaN difference must count as a mismatch
    return np.nonzero(~(np.abs(projections - stored[:, 0]) <= tolerance))[0]


def describe_differences(
    stored: dict[str, Any], given: dict[str, Any], keys: Sequence[str]
) -> list[str]:
    """'key X in the store vs Y given' for each differing key."""
    return [
        f"{key} {_short(stored.get(key))} in the store vs {_short(given.get(key))} given"
        for key in keys
        if stored.get(key) != given.get(key)
    ]


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256: the first 12 hex digits suffice
        return value[:12]
    if isinstance(value, list):
        return str(tuple(value))
    return str(value)
