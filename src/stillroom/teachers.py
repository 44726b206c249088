"""Teachers as the loop sees them: a callable `(inputs, index) -> outputs`.

`FrozenTeacher` runs a live module (eval mode, no gradients, inference mode); `CachedTeacher`
looks up outputs computed once (soft targets generated ahead of training) by sample index, in
memory; `stillroom.store.StoreTeacher` does the same from a memory-mapped store on disk.
`EnsembleTeacher` merges several such teachers into one soft label (`EnsembleModule`: live member
modules as one module, e.g. to cache the merged ensemble into one store).
Temperature is applied by the loss, never here, so one set of cached logits serves every T.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors
from stillroom.losses import IGNORE_INDEX
from stillroom.models import device_of
from stillroom.store.teacher import StoreTeacher


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
        return self.outputs.index_select(0, index.to(self.outputs.device))

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
    device = device_of(teacher)
    n = len(loader.dataset)
    outputs: torch.Tensor | None = None
    seen = torch.zeros(n, dtype=torch.bool)
    for inputs, _, index in loader:
        out = frozen(inputs.to(device)).float().cpu()
        if outputs is None:  # one (N, ...) tensor filled by index: no object per sample
            outputs = torch.empty((n, *out.shape[1:]), dtype=out.dtype)
        outputs[index] = out
        seen[index] = True
    assert outputs is not None and bool(seen.all()), "loader must visit every sample"
    return CachedTeacher(outputs)


# --- ensembles: several teachers merged into one soft label -------------------------------------

COMBINES = ("mean_prob", "mean_logit")
"""How an ensemble merges its members' outputs (see `combine_outputs`)."""


def combine_outputs(
    member_outputs: torch.Tensor, weights: torch.Tensor | None = None, combine: str = "mean_prob"
) -> torch.Tensor:
    """Merge the outputs of M ensemble members into one set of logits.

    Args:
        member_outputs: (M, N, C, ...), member m's (N, C, ...) outputs with the classes on dim 1.
        weights: (M,) non-negative, summing to 1; None weighs every member 1/M.
        combine: "mean_prob": log(sum_m w_m softmax(z_m)), the log of the mixture of the members'
            probabilities, the usual ensemble prediction (Hinton et al. 2015, arXiv:1503.02531,
            sec. 1; Lakshminarayanan et al. 2017, arXiv:1612.01474). These log-probabilities are
            valid logits: softmax(log p_bar) = p_bar, and a distillation loss at temperature T
            sees softmax(log p_bar / T) = p_bar**(1/T) / Z, the mixture softened as one model's
            probabilities would be. "mean_logit": sum_m w_m z_m, whose softmax is the normalised
            weighted geometric mean of the members' probabilities; for regression outputs it is
            the weighted mean prediction (mean_prob has no meaning there).

    Returns:
        (N, C, ...) float32 logits of the ensemble.
    """
    if combine not in COMBINES:
        raise StillroomError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    outputs = member_outputs.float()
    count = outputs.shape[0]
    if weights is None:
        weights = torch.full((count,), 1.0 / count, device=outputs.device)
    assert weights.shape == (count,), f"{count} members but weights shaped {tuple(weights.shape)}"
    w = weights.to(outputs.device, torch.float32).view(count, *([1] * (outputs.dim() - 1)))
    if combine == "mean_logit":
        return (w * outputs).sum(0)
    # in log space: probabilities of confident members underflow to 0 in float32, and log(0) would
    # make the distillation loss nan; log(0) weights are -inf terms logsumexp handles exactly
    return torch.logsumexp(torch.log(w) + torch.log_softmax(outputs, dim=2), dim=0)


def ensemble_weights(weights: Sequence[float] | torch.Tensor | None, count: int) -> torch.Tensor:
    """(count,) float32 weights normalised to sum 1; None: uniform. Refuses negative/missing ones."""
    if weights is None:
        return torch.full((count,), 1.0 / count)
    given = torch.as_tensor(weights, dtype=torch.float32).detach().cpu().flatten()
    if len(given) != count:
        raise StillroomError(
            f"{len(given)} ensemble weights for {count} members; give one weight per member"
        )
    if not torch.isfinite(given).all() or (given < 0).any() or given.sum() <= 0:
        raise StillroomError(
            f"ensemble weights must be finite, >= 0 and not all 0, got {given.tolist()}"
        )
    return given / given.sum()


def check_member_shapes(shapes: Sequence[tuple[int, ...] | None], what: str = "outputs") -> None:
    """Every member must give the same output shape: the same classes, in the same order.

    shapes: one per member; None for a member whose shape is not known yet (checked at call time).
    """
    known = [(i, s) for i, s in enumerate(shapes) if s is not None]
    for i, shape in known[1:]:
        first, ref = known[0]
        if shape == ref:
            continue
        classes = (
            f" ({shape[1]} classes vs {ref[1]})"
            if what == "outputs" and len(shape) > 1 and len(shape) == len(ref)
            else ""
        )
        raise StillroomError(
            f"ensemble member {i} {what} {shape} but member {first} {what} {ref}{classes}: every "
            f"member must give the same output shape, the same classes in the same order; check "
            f"member {i}'s number of outputs (or the data its store was computed on)"
        )


def _declared_shape(member: Teacher) -> tuple[int, ...] | None:
    """A cached member's per-sample output shape, known before any batch; None for live ones."""
    if isinstance(member, CachedTeacher):
        return tuple(member.outputs.shape[1:])
    if isinstance(member, StoreTeacher):
        if member.store.kind != "dense":
            raise StillroomError(
                f"store {member.store.path} holds top-k targets; an ensemble averages full outputs: "
                "cache its members without --top-k"
            )
        return tuple(member.store.manifest.output_shape)
    return None


class EnsembleModule(nn.Module):
    """Live member modules (any architectures) run as one module: `forward(x) -> (N, C, ...)`.

    An `nn.Module`, so it serves wherever a module teacher does: as the teacher of `distill`, in
    `stillroom.store.cache_teacher` (one merged store for the whole ensemble), for `evaluate`. The
    weights and the combine rule are buffers: a store's teacher fingerprint (sha256 of the
    state_dict) then ties the store to the members, their weights and the rule.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        combine: str = "mean_prob",
        weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise StillroomError("an ensemble needs at least one member")
        if combine not in COMBINES:
            raise StillroomError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.register_buffer("weights", ensemble_weights(weights, len(members)))
        self.register_buffer("combine_id", torch.tensor(COMBINES.index(combine)))

    def member_outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """(M, N, C, ...): every member's outputs, after checking they agree in shape."""
        outputs = [member(inputs) for member in self.members]
        check_member_shapes([tuple(out.shape) for out in outputs])
        return torch.stack([out.float() for out in outputs])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return combine_outputs(self.member_outputs(inputs), self.weights, self.combine)


class EnsembleTeacher:
    """Several teachers merged into one: `(inputs, index) -> (N, C, ...)` ensemble logits.

    members: live modules (wrapped as `FrozenTeacher`s) and/or cached teachers (`CachedTeacher`,
    `stillroom.store.StoreTeacher`: one store per member), of any architectures. See
    `combine_outputs` for `combine` and what the distillation temperature means for "mean_prob".
    Members that disagree in output shape or class count are refused naming the member: at
    construction for cached members, and for live ones when `example` (a batch `(inputs, index)`)
    is given; at every call otherwise.
    """

    def __init__(
        self,
        members: Sequence[nn.Module | Teacher],
        combine: str = "mean_prob",
        weights: Sequence[float] | torch.Tensor | None = None,
        *,
        example: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        if not members:
            raise StillroomError("an ensemble needs at least one member")
        if combine not in COMBINES:
            raise StillroomError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        self.members = [as_teacher(member) for member in members]
        self.combine = combine
        self.weights = ensemble_weights(weights, len(self.members))
        check_member_shapes(
            [_declared_shape(member) for member in self.members], what="outputs per sample"
        )
        if example is not None:
            self.member_outputs(*example)

    def to(self, device: torch.device | str) -> EnsembleTeacher:
        # members follow the loop's device like a single teacher would (the Teacher contract)
        self.members = [member.to(device) for member in self.members]
        return self

    def member_outputs(self, inputs: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """(M, N, C, ...) float32 on the device of `inputs`, after checking the shapes agree."""
        outputs = []
        for i, member in enumerate(self.members):
            out = member(inputs, index)
            if not isinstance(out, torch.Tensor):
                raise StillroomError(
                    f"ensemble member {i} gives {type(out).__name__}, not a tensor of outputs "
                    "(a top-k store?); an ensemble averages full outputs"
                )
            outputs.append(out.to(inputs.device, torch.float32))
        check_member_shapes([tuple(out.shape) for out in outputs])
        return torch.stack(outputs)

    def __call__(self, inputs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return combine_outputs(self.member_outputs(inputs, index), self.weights, self.combine)


def fit_ensemble_weights(
    member_outputs: torch.Tensor,
    targets: torch.Tensor,
    combine: str = "mean_prob",
    *,
    steps: int = 300,
) -> torch.Tensor:
    """Simplex weights that minimise the ensemble's loss on held-out (validation) data.

    Args:
        member_outputs: (M, N, C) every member's outputs on the validation samples.
        targets: (N,) int64 class ids (IGNORE_INDEX: skipped), minimising the ensemble's negative
            log-likelihood; or float regression targets (N,) / (N, D) (NaN: skipped), minimising
            the squared error of the weighted mean prediction (combine "mean_logit" only).
        combine: the rule the weights are for (see `combine_outputs`).
        steps: most L-BFGS iterations.

    Returns:
        (M,) weights >= 0 that sum to 1: softmax(theta), theta fitted by L-BFGS from 0 (uniform
        weights), so the result is deterministic for given outputs. Fit on data the students are
        not tested on: the weights are selected, like any hyperparameter, on validation data.
    """
    if combine not in COMBINES:
        raise StillroomError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    # clone out of inference mode: teacher outputs computed there cannot enter autograd
    outputs = member_outputs.detach().float().cpu().clone()
    targets = targets.detach().cpu().clone()
    if outputs.dim() < 2 or outputs.shape[1] != targets.shape[0]:
        raise StillroomError(
            f"member outputs {tuple(outputs.shape)} (members, samples, ...) do not match "
            f"{targets.shape[0]} targets"
        )
    if targets.is_floating_point():
        if combine != "mean_logit":
            raise StillroomError(
                "regression ensembles average predictions: use combine mean_logit, not mean_prob"
            )
        targets = targets.view(outputs.shape[1:])
        keep = ~torch.isnan(targets)

        def loss_of(weights: torch.Tensor) -> torch.Tensor:
            merged = combine_outputs(outputs, weights, combine)
            return (merged - targets.nan_to_num())[keep].pow(2).mean()
    else:
        keep = targets != IGNORE_INDEX

        def loss_of(weights: torch.Tensor) -> torch.Tensor:
            merged = combine_outputs(outputs[:, keep], weights, combine)
            return nn.functional.cross_entropy(merged, targets[keep])

    if not keep.any():
        raise StillroomError("no labelled validation samples to fit the ensemble weights on")
    with torch.enable_grad():
        theta = torch.zeros(outputs.shape[0], requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_of(torch.softmax(theta, 0))
            loss.backward()
            return loss

        optimizer.step(closure)
    return torch.softmax(theta.detach(), 0)
