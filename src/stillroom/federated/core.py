"""The parts of federated distillation, in plain torch: the non-IID split, a client's local
training, FedAvg, and the server's ensemble distillation (FedDF).

    clients (raw data never leaves them) --weights--> server
    server: FedAvg within each architecture, then every prototype distilled from the mean logits
            of all client models on its own unlabelled transfer set (FedDF: Lin et al. 2020,
            "Ensemble Distillation for Robust Model Fusion in Federated Learning",
            arXiv:2006.07242, Algorithm 1)

These functions are what the Flower `ClientApp` / `Strategy` (stillroom.federated.flower) call, and
what the in-process engine of `method: federated` calls; they train with a small plain loop of
their own because a round is many tiny trainings (10 clients x a few epochs of a few dozen
samples), where the shared loop's per-run setup (Accelerate, checkpoints, validation each epoch)
would cost more than the training itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX

State = dict[str, torch.Tensor]


# --- the non-IID split ---------------------------------------------------------------------------


def dirichlet_split(
    targets: torch.Tensor, num_clients: int, alpha: float, seed: int, num_classes: int
) -> list[torch.Tensor]:
    """Sample indices per client: for every class, its samples are dealt to the clients in
    proportions drawn from Dirichlet(alpha * 1) (Hsu et al. 2019, arXiv:1909.06335; the split
    FedDF uses). Small alpha: each client sees few classes; large alpha: close to IID.

    targets: (N,) int64 class ids. Returns num_clients sorted index tensors covering every sample
    once. A client left with no sample is redrawn (up to 100 draws), then one line."""
    n = int(targets.shape[0])
    if not (alpha > 0 and math.isfinite(alpha)):
        raise StillroomError(f"federated.alpha must be > 0 (Dirichlet concentration), got {alpha}")
    if num_clients < 1:
        raise StillroomError(f"federated.clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise StillroomError(
            f"federated.clients {num_clients} is more than the {n} training samples the clients "
            "share; use at most {n} clients".replace("{n}", str(n))
        )
    rng = np.random.default_rng(seed)
    labels = targets.numpy()
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client] += chunk.tolist()
        if min(len(p) for p in parts) > 0:
            return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]
    raise StillroomError(
        f"a client has no data after 100 Dirichlet draws (alpha {alpha}, {num_clients} clients, "
        f"{n} samples); use fewer clients or a larger federated.alpha"
    )


# --- models as messages --------------------------------------------------------------------------


def get_state(model: nn.Module) -> State:
    """A detached copy of the model's parameters and buffers (what a client sends)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_bytes(state: State) -> int:
    """Bytes of one model on the wire (its tensors, uncompressed)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """The sample-weighted mean of same-architecture states (McMahan et al. 2017,
    arXiv:1602.05629); integer buffers (batch-norm counters) are taken from the first."""
    total = float(sum(weights))
    assert states and total > 0
    mean: State = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            mean[key] = first.clone()
            continue
        mean[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
    return mean


# --- training and scoring ------------------------------------------------------------------------


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def local_train(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """A client's round: `epochs` of Adam on cross-entropy over its own shard (in place).
    inputs: (n, *input_shape); targets: (n,) class ids."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for index in _batches(len(inputs), batch_size, generator):
            loss = F.cross_entropy(model(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """(N, C) outputs of `model` in eval mode."""
    model.eval()
    return torch.cat([model(chunk) for chunk in inputs.split(batch_size)])


@torch.no_grad()
def ensemble_logits(models: Sequence[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """(N, C) mean of the client models' logits: FedDF's fused teacher (Algorithm 1, line 11)."""
    return torch.stack([logits_of(m, inputs) for m in models]).mean(0)


def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    keep = targets != IGNORE_INDEX
    predictions = logits_of(model, inputs[keep]).argmax(1)
    return (predictions == targets[keep]).float().mean().item()


def distill_server(
    model: nn.Module,
    teacher_logits: torch.Tensor,
    transfer: torch.Tensor,
    val_inputs: torch.Tensor,
    val_targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    temperature: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """Ensemble distillation on unlabelled transfer inputs (in place): `steps` of Adam on
    T**2 * KL(softmax(teacher / T) || softmax(student / T)); the weights of the step with the best
    validation accuracy are kept, the FedAvg start included (FedDF's early stopping on the
    server's validation data).

    teacher_logits: (M, C), one row per transfer input (M, *input_shape)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state = accuracy(model, val_inputs, val_targets), get_state(model)
    soft = F.softmax(teacher_logits / temperature, dim=1)
    every = max(1, steps // 10)
    step = 0
    while step < steps:
        for index in _batches(len(transfer), batch_size, generator):
            model.train()
            log_p = F.log_softmax(model(transfer[index]) / temperature, dim=1)
            loss = F.kl_div(log_p, soft[index], reduction="batchmean") * temperature**2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % every == 0 or step == steps:
                score = accuracy(model, val_inputs, val_targets)
                if score > best:
                    best, best_state = score, get_state(model)
            if step >= steps:
                break
    model.load_state_dict(best_state)
    return model.eval()
