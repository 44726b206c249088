"""Training-time augmentation: random shifts, flips, noise and input dropout of each batch.

`Augment` is a `batch_transform` for `stillroom.train.distill`: the loop calls it on every training
batch before the step, with the count of batches seen so far. Each batch's draw comes from a
generator seeded by (seed, batch count), so a run replays exactly, resumes included, and the
teacher (live) and the student see the same augmented view. Validation and test batches are never
augmented.

A cached teacher (soft targets or a store) holds one output per sample, computed on the inputs as
they are: with augmentation the student would be matched to the teacher's view of another image,
so a method that augments runs its teacher live (see methods/classic.py).

Hinton et al. 2015 (arXiv:1503.02531, sec. 3) jitter MNIST digits by up to two pixels in any
direction and apply dropout to the inputs: `shift: 2`, `input_dropout: 0.2`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from stillroom.errors import StillroomError

SEED_STRIDE = 1_000_003
"""Batch b of a run with seed s draws from a generator seeded s * SEED_STRIDE + b."""


class AugmentSection(BaseModel):
    """The `data.augment:` section of a recipe (every field off by default)."""

    model_config = ConfigDict(extra="forbid")

    shift: int = Field(
        0, ge=0, le=64, description="images: move each by up to this many pixels in x and y "
        "(zero-filled), independently per sample",
    )  # fmt: skip
    flip: bool = Field(False, description="images: mirror left-right, each with probability 0.5")
    noise: float = Field(0.0, ge=0, description="add Gaussian noise of this std to every input")
    input_dropout: float = Field(
        0.0, ge=0, lt=1, description="zero each input value with this probability (the rest "
        "scaled by 1 / (1 - p), as nn.Dropout)",
    )  # fmt: skip
    students: bool = Field(
        True, description="augment the students' batches too; false: the teacher's training "
        "alone (Hinton et al. jittered the teacher; the distilled student saw plain digits)",
    )  # fmt: skip

    @property
    def active(self) -> bool:
        return bool(self.shift or self.flip or self.noise or self.input_dropout)


class Augment:
    """batch_transform(inputs, targets, index, student, batch) -> the augmented batch."""

    def __init__(self, section: AugmentSection, input_shape: tuple[int, ...], seed: int) -> None:
        if (section.shift or section.flip) and len(input_shape) != 3:
            raise StillroomError(
                f"data.augment shift/flip move pixels of images (channels, height, width), but "
                f"the inputs have shape {tuple(input_shape)}; use noise / input_dropout, or image "
                "data"
            )
        if section.shift and section.shift >= min(input_shape[1:]):
            raise StillroomError(
                f"data.augment.shift={section.shift} moves the {input_shape[1]}x{input_shape[2]} "
                "images entirely out of view; give a shift smaller than the image"
            )
        self.section, self.seed = section, seed

    def __call__(
        self, inputs: torch.Tensor, targets: Any, index: Any, student: Any, batch: int
    ) -> tuple[torch.Tensor, Any, Any]:
        gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + batch)
        x, s = inputs, self.section
        if s.shift:
            x = shift(x, s.shift, gen)
        if s.flip:
            mirrored = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(mirrored.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
        if s.noise:
            x = x + s.noise * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        if s.input_dropout:
            keep = torch.rand(x.shape, generator=gen) >= s.input_dropout
            x = x * keep.to(x.device, x.dtype) / (1.0 - s.input_dropout)
        return x, targets, index


def shift(images: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """(N, C, H, W) images each moved by its own (dy, dx) in [-pixels, pixels], zero-filled."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen).to(images.device)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen).to(images.device)
    rows = dy[:, None] + torch.arange(height, device=images.device)  # (N, H)
    cols = dx[:, None] + torch.arange(width, device=images.device)  # (N, W)
    sample = torch.arange(n, device=images.device)[:, None, None]
    # advanced indexing on dims 0, 2, 3 puts the channels last: (N, H, W, C)
    window = padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]]
    return window.permute(0, 3, 1, 2).contiguous()
