"""DataLoaders that yield `(inputs, targets, index)`: the index lets a cached teacher look up
the soft targets of exactly these samples, however the loader shuffles.

A batch is gathered by index in one step (`__getitems__`), not sample by sample and then
collated: the same tensors, without a Python call per sample, and for inputs kept on disk
(`MappedInputs`) one read per batch. The batches of indices come whole too (`SeededBatches`), not
one Python int at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
        # a batch from SeededBatches carries its tensor; a list from elsewhere (another sampler,
        # Accelerate's padding of a multi-process run's last batch) is converted
        index = (
            indices.index
            if isinstance(indices, IndexBatch) and len(indices.index) == len(indices)
            else torch.as_tensor(indices, dtype=torch.int64)  # also a padded (extended) batch
        )
        # index_select copies whole rows; on the CPU it is several times faster than x[index]
        inputs = (
            self.inputs.index_select(0, index)
            if isinstance(self.inputs, torch.Tensor)
            else self.inputs[index]
        )
        return inputs, self.targets.index_select(0, index), index


class IndexBatch(list):
    """A batch of sample indices (a list, as samplers give them) that also carries them as the
    int64 tensor the gather needs, made once from the permutation rather than from the list."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__(index.tolist())
        self.index = index


class SeededBatches(Sampler[list[int]]):
    """Batches of sample indices; shuffled, the order is `torch.randperm` drawn from seed + epoch.

    That is the order Accelerate's seedable sampler gives a shuffled loader (the same permutation
    from the same seed), so every process of a multi-process run agrees on it and a resumed run
    replays it; but the indices come a batch at a time instead of one Python int at a time.
    `distill` sets `seed` to the run's seed and calls `set_epoch` at each epoch's start. Not a
    `RandomSampler`, so Accelerate keeps it (and shards its batches across processes).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Any:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        for batch in order.split(self.batch_size):
            yield IndexBatch(batch)


def _gathered(batch: Any) -> Any:
    """The collate step of a dataset that gathers whole batches: the batch as it came."""
    return batch


def make_loader(data: ArrayData, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader over `data`; the training loop seeds its shuffling per epoch."""
    return DataLoader(
        GatheredDataset(data.inputs, data.targets),
        batch_sampler=SeededBatches(len(data.inputs), batch_size, shuffle),
        collate_fn=_gathered,
    )
