"""`StoreTeacher`: a store read as a teacher, `(inputs, index) -> outputs`, for the training loop."""

from __future__ import annotations

from pathlib import Path

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

    Every batch's inputs are compared with the fingerprints stored for those sample ids, so a loader
    that augments its inputs, or indexes another dataset, fails loudly instead of training on soft
    targets of other inputs. Pass `teacher` and/or `data` to also check, up front, that the store
    was computed by this teacher (weights hash) on this dataset (count, shapes, sample hash).
    """

    def __init__(
        self,
        store: SoftTargetStore | Path | str,
        *,
        teacher: nn.Module | None = None,
        data: torch.Tensor | ArrayData | Dataset | None = None,
    ) -> None:
        # every shard hashed now, before the first phase that reads it: a damaged byte is named
        # (with the command that repairs it) before any student trains, not after one has
        self.store = (
            store
            if isinstance(store, SoftTargetStore)
            else SoftTargetStore.open(store, verify=True)
        )
        self.store.check(teacher=teacher, data=data)

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
        if self.store.kind == "dense":
            rows = self.store.read_fields(["input_fingerprint", "logits"], ids)
            self.store.check_inputs(inputs, ids, rows["input_fingerprint"])
            return torch.from_numpy(rows["logits"]).to(inputs.device, torch.float32)
        self.store.check_inputs(inputs, ids)
        return self.store.topk(ids).to(inputs.device)
