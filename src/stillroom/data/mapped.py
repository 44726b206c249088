"""Inputs too large for memory: a float32 array on disk, memory-mapped and read a batch at a time.

`MappedInputs` stands where an (N, *shape) float32 tensor stands in `ArrayData.inputs`: it has a
length and a shape, and indexing it (an int, a slice, an index tensor) reads just those rows from
disk, applying the split's standardisation as it goes. Taking a split (`take`) or standardising
(`rescaled`) reads nothing: they compose an index and an affine map. So splits, the few-label
setting, the loaders, the store and evaluation all work on data that never sits in memory whole.

Data larger than `data.memory_limit_mb` is mapped (`stillroom.data.sources`): an uncompressed
`.npz` member in place, image folders and tables decoded batch by batch into a scratch file that
the operating system deletes when the run ends (`scratch_array`).
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

CHUNK_ROWS = 4096
"""Rows read at a time when a pass over every sample is needed (statistics, evaluation)."""


class MappedInputs:
    """Rows `index` of a memory-mapped (M, *shape) float32 array, each flattened row rescaled as
    `(row - mean) / std` when statistics are given. Read-only: indexing returns new tensors."""

    def __init__(
        self,
        array: np.ndarray,
        index: np.ndarray | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        self.array = array
        self.index = index
        self.mean, self.std = mean, std

    # the tensor-like surface the data layer and its readers use
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.array.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def dim(self) -> int:
        return self.array.ndim

    def __len__(self) -> int:
        return len(self.array) if self.index is None else len(self.index)

    def __getitem__(self, key: int | slice | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        if isinstance(key, int):
            return self._read(np.array([key]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(*key.indices(len(self))))
        return self._read(np.asarray(key, dtype=np.int64).reshape(-1))

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        positions = rows if self.index is None else self.index[rows]
        # rows in file order read the pages once; the batch keeps the order it was asked in
        order = np.argsort(positions, kind="stable")
        block = np.empty((len(positions), *self.array.shape[1:]), dtype=np.float32)
        block[order] = self.array[positions[order]]
        x = torch.from_numpy(block)
        if self.mean is not None:
            assert self.std is not None
            x = ((x.reshape(len(x), -1) - self.mean) / self.std).reshape(x.shape)
        return x

    def take(self, rows: torch.Tensor | np.ndarray) -> MappedInputs:
        """The rows `rows` of these inputs, without reading them."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        index = rows if self.index is None else self.index[rows]
        return MappedInputs(self.array, index, self.mean, self.std)

    def rescaled(self, mean: torch.Tensor, std: torch.Tensor) -> MappedInputs:
        """These inputs standardised per flattened feature (applied as each batch is read)."""
        assert self.mean is None, "inputs are standardised once, from the training split"
        return MappedInputs(self.array, self.index, mean, std)

    def raw(self) -> MappedInputs:
        """These rows as stored (the standardisation removed)."""
        return MappedInputs(self.array, self.index)

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), rows):
            yield self[start : start + rows]

    def __repr__(self) -> str:
        return (
            f"MappedInputs(shape={tuple(self.shape)}, file={getattr(self.array, 'filename', None)})"
        )


def flat_mean_std(inputs: MappedInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of each flattened feature, one chunk in memory at a time
    (float64 sums, so the figures match an in-memory pass to float32 precision)."""
    count, total, squares = 0, None, None
    for chunk in inputs.chunks():
        flat = chunk.reshape(len(chunk), -1).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        squares = (flat**2).sum(0) if squares is None else squares + (flat**2).sum(0)
        count += len(flat)
    assert total is not None and squares is not None and count > 0
    mean = total / count
    var = (squares - count * mean**2) / max(count - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


def npz_member(path: Path, name: str) -> np.ndarray | None:
    """Array `name` of the .npz at `path`, memory-mapped in place; None when the member is
    compressed (np.savez_compressed) and so cannot be mapped."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(member)
            header = member.tell()
    with open(path, "rb") as raw:
        # the member's data starts after the zip's local header (30 bytes + name + extra field)
        raw.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(raw.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(name_length) + int(extra_length) + header
    if dtype.hasobject:
        raise ValueError("object arrays need pickle")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape, order=order)


def scratch_array(shape: tuple[int, ...], workdir: Path | None) -> np.ndarray:
    """A writable float32 array of `shape` backed by an unnamed file in `workdir` (the run folder;
    None: the system's temporary folder). The file has no name on disk: it is gone when the array
    is, even if the process is killed."""
    with tempfile.TemporaryFile(dir=workdir) as handle:
        handle.truncate(max(int(np.prod(shape)) * 4, 1))
        # the map holds its own handle on the file: closing ours leaves the array readable
        return np.memmap(handle, dtype=np.float32, mode="r+", shape=shape)
