"""DataLoaders that yield `(inputs, targets, index)`: the index lets a cached teacher look up
the soft targets of exactly these samples, however the loader shuffles."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from stillroom.data.builtin import ArrayData


class IndexedDataset(Dataset):
    """(inputs[i], targets[i], i) for tensors held in memory."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        assert len(inputs) == len(targets)
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.inputs[i], self.targets[i], i


def make_loader(data: ArrayData, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader over `data`; the training loop seeds its shuffling per epoch."""
    return DataLoader(
        IndexedDataset(data.inputs, data.targets), batch_size=batch_size, shuffle=shuffle
    )
