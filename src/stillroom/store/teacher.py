"""`StoreTeacher`: a store read as a teacher, `(inputs, index) -> outputs`, for the training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from stillroom.data import ArrayData
from stillroom.errors import StillroomError
from stillroom.losses.topk import TopKTargets
from stillroom.store.reader import SoftTargetStore


class StoreTeacher:
    """The teacher's cached outputs for the samples of a batch, looked up by sample index.

    Returns, on the device of `inputs`: for a dense store the (B, *output_shape) float32 logits;
    for a top-k store `TopKTargets` (use `stillroom.losses.topk.topk_soft_target_loss`).

    Every sample's inputs are compared with the fingerprint stored for its id the first time the
    sample is read, so a loader that augments its inputs, or indexes another dataset, fails loudly
    (in its first batch) instead of training on soft targets of other inputs; a sample already
    checked is not checked again in later epochs (`recheck=True` compares every batch: for loaders
    that may rewrite a sample's inputs after its first read, as on-policy sampling does). Pass `teacher` and/or `data` to also check, up
    front, that the store was computed by this teacher (weights hash) on this dataset (count,
    shapes, sample hash).

    A dense store whose logits take at most `resident_mb` is read whole into memory on first use
    (the pages were going to be read every epoch anyway): a batch's lookup is then an index into a
    tensor, as fast as logits held in memory. A larger or top-k store is read batch by batch.
    """

    def __init__(
        self,
        store: SoftTargetStore | Path | str,
        *,
        teacher: nn.Module | None = None,
        data: torch.Tensor | ArrayData | Dataset | None = None,
        resident_mb: float = 512,
        recheck: bool = False,
    ) -> None:
        # every shard hashed now, before the first phase that reads it: a damaged byte is named
        # (with the command that repairs it) before any student trains, not after one has
        self.store = (
            store
            if isinstance(store, SoftTargetStore)
            else SoftTargetStore.open(store, verify=True)
        )
        self.store.check(teacher=teacher, data=data)
        self.resident_mb = resident_mb
        self.recheck = recheck
        self._checked = np.zeros(len(self.store), dtype=bool)  # ids whose inputs were compared
        self._logits: torch.Tensor | None = None  # the whole dense store, once read

    def to(self, device: torch.device | str) -> StoreTeacher:
        # rows are read per batch and moved to the inputs' device; nothing to move up front
        return self

    def __len__(self) -> int:
        return len(self.store)

    def __call__(
        self, inputs: torch.Tensor, index: torch.Tensor | None
    ) -> torch.Tensor | TopKTargets:
        if index is None:
            raise StillroomError(
                "a store teacher needs the sample index of every batch: use a loader that yields "
                "(inputs, targets, index), e.g. stillroom.data.make_loader"
            )
        if len(index) != len(inputs):
            raise StillroomError(f"batch has {len(inputs)} inputs but {len(index)} indices")
        ids = index.detach().cpu().numpy()
        self._check_once(inputs, ids)
        if self.store.kind != "dense":
            return self.store.topk(ids).to(inputs.device)
        if self._logits is None and self._logits_mb() <= self.resident_mb:
            every = np.arange(len(self.store))
            self._logits = torch.from_numpy(self.store.read("logits", every)).float()
        if self._logits is not None:
            if self._logits.device != inputs.device:
                self._logits = self._logits.to(inputs.device)
            return self._logits.index_select(0, index.to(inputs.device))
        rows = self.store.read("logits", ids)
        return torch.from_numpy(rows).to(inputs.device, torch.float32)

    def _check_once(self, inputs: torch.Tensor, ids: np.ndarray) -> None:
        """Compare the inputs of the samples not checked before with their fingerprints."""
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.store)):
            self.store.read("input_fingerprint", ids)  # names the index out of range
        if self.recheck:
            self.store.check_inputs(inputs, ids)
            return
        fresh = ~self._checked[ids]
        if not fresh.any():
            return
        if fresh.all():
            self.store.check_inputs(inputs, ids)
        else:
            self.store.check_inputs(inputs[torch.from_numpy(fresh).to(inputs.device)], ids[fresh])
        self._checked[ids[fresh]] = True

    def _logits_mb(self) -> float:
        spec = self.store.manifest.fields["logits"]
        row = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
        return len(self.store) * row / 2**20
