"""DataLoaders that yield `(inputs, targets, index)`: the index lets a cached teacher look up
the soft targets of exactly these samples, however the loader shuffles.

A batch is gathered by index in one step (`__getitems__`), not sample by sample and then
collated: the same tensors, without a Python call per sample, and for inputs kept on disk
(`MappedInputs`) one read per batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from stillroom.data.builtin import ArrayData
from stillroom.data.mapped import MappedInputs


class IndexedDataset(Dataset):
    """(inputs[i], targets[i], i) for inputs held in memory or mapped from disk."""

    def __init__(self, inputs: torch.Tensor | MappedInputs, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets; they must match")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.inputs[i], self.targets[i], i


class GatheredDataset(IndexedDataset):
    """An IndexedDataset whose batches are gathered in one step: `make_loader`'s. A DataLoader
    over it needs its collate (`loader.collate_fn`), as the batch comes already whole."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.inputs[index], self.targets[index], index


def _gathered(batch: Any) -> Any:
    """The collate step of a dataset that gathers whole batches: the batch as it came."""
    return batch


def make_loader(data: ArrayData, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader over `data`; the training loop seeds its shuffling per epoch."""
    return DataLoader(
        GatheredDataset(data.inputs, data.targets),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=_gathered,
    )
