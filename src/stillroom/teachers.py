"""Teachers as the loop sees them: a callable `(inputs, index) -> outputs`.

`FrozenTeacher` runs a live module (eval mode, no gradients, inference mode); `CachedTeacher`
looks up outputs computed once (soft targets generated ahead of training) by sample index, in
memory; `stillroom.store.StoreTeacher` does the same from a memory-mapped store on disk.
Temperature is applied by the loss, never here, so one set of cached logits serves every T.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors


class Teacher(Protocol):
    def __call__(self, inputs: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor: ...


class FrozenTeacher:
    """A teacher module that is never updated: eval mode, requires_grad off, run in inference mode.

    eval(): dropout would make its soft targets noisy and batch-norm statistics would drift.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str) -> FrozenTeacher:
        self.module.to(device)
        return self

    def __call__(self, inputs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        self.module.eval()  # the caller may have flipped it back to train mode
        with torch.inference_mode():
            out = self.module(inputs)
        # clone outside inference mode: autograd may save this tensor for the student's backward
        if isinstance(out, dict):  # named outputs (multi-task heads)
            return {key: value.clone() for key, value in out.items()}
        return out.clone()


class CachedTeacher:
    """Teacher outputs precomputed for every sample of a dataset, looked up by sample index.

    outputs: (N, *output_shape), row i belongs to sample i of the dataset the loader indexes.
    """

    def __init__(self, outputs: torch.Tensor) -> None:
        self.outputs = outputs

    def to(self, device: torch.device | str) -> CachedTeacher:
        self.outputs = self.outputs.to(device)
        return self

    def __len__(self) -> int:
        return self.outputs.shape[0]

    def __call__(self, inputs: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            raise StillroomError(
                "a cached teacher needs the sample index of every batch: use a loader that yields "
                "(inputs, targets, index), e.g. stillroom.data.make_loader"
            )
        if len(index) != len(inputs):
            raise StillroomError(f"batch has {len(inputs)} inputs but {len(index)} indices")
        return self.outputs[index.to(self.outputs.device)]

    def save(self, path: Path) -> None:
        atomic_save_tensors({"outputs": self.outputs}, path)

    @classmethod
    def load(cls, path: Path) -> CachedTeacher:
        if not Path(path).is_file():
            raise StillroomError(f"soft-target file {path} does not exist")
        return cls(load_file(str(path))["outputs"])


def as_teacher(teacher: nn.Module | Teacher) -> Teacher:
    """Wrap a plain module as a FrozenTeacher; pass teachers that are already callables through."""
    return FrozenTeacher(teacher) if isinstance(teacher, nn.Module) else teacher


@torch.no_grad()  # not inference_mode: the cached outputs must stay ordinary, editable tensors
def generate_soft_targets(teacher: nn.Module, loader: DataLoader) -> CachedTeacher:
    """Run the frozen teacher once over an unshuffled `(inputs, targets, index)` loader."""
    frozen = FrozenTeacher(teacher)
    device = next(teacher.parameters()).device
    chunks: dict[int, torch.Tensor] = {}
    for inputs, _, index in loader:
        out = frozen(inputs.to(device)).float().cpu()
        for i, row in zip(index.tolist(), out, strict=True):
            chunks[i] = row
    n = len(loader.dataset)
    assert sorted(chunks) == list(range(n)), "loader must visit every sample exactly once"
    return CachedTeacher(torch.stack([chunks[i] for i in range(n)]))
