"""Rounds of federated training in one process (the engine `method: federated` uses by default;
the Flower apps in stillroom.federated.flower run the same client and server functions).

Every round is a phase: RUN/<algorithm>/round_NNN/ holds one model folder per architecture group
and done.json (written last) with the round's test accuracy and bytes, so --resume continues at
the first round without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.federated.core import (
    State,
    accuracy,
    distill_server,
    ensemble_logits,
    fedavg,
    get_state,
    local_train,
    state_bytes,
)
from stillroom.models import build_model, load_model, save_model
from stillroom.runs import is_complete, mark_complete

ALGORITHMS = ("fedavg", "feddf")
"""fedavg: the mean of the clients' weights (per architecture group); feddf: that mean, then
distilled on the server from the mean logits of every client model, of every architecture."""


@dataclass(frozen=True)
class Federation:
    """What the rounds need, as plain values (built from the recipe by the method)."""

    specs: list[dict[str, Any]]  # one per architecture group
    client_group: list[int]  # client k trains a model of specs[client_group[k]]
    shards: list[tuple[torch.Tensor, torch.Tensor]]  # client k's (inputs, targets)
    transfer: torch.Tensor  # the server's unlabelled inputs
    val: tuple[torch.Tensor, torch.Tensor]  # the server's validation data (early stopping)
    test: tuple[torch.Tensor, torch.Tensor]
    input_shape: tuple[int, ...]
    num_outputs: int
    rounds: int
    local_epochs: int
    lr: float
    batch_size: int
    server_steps: int
    server_lr: float
    temperature: float
    seed: int


def build_seeded(fed: Federation, group: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(fed.specs[group], fed.input_shape, fed.num_outputs)


def client_update(fed: Federation, k: int, state: State, round_: int) -> tuple[State, int]:
    """Client k's round from the global state of its group: (its new state, its sample count)."""
    model = build_model(fed.specs[fed.client_group[k]], fed.input_shape, fed.num_outputs)
    model.load_state_dict(state)
    inputs, targets = fed.shards[k]
    local_train(
        model,
        inputs,
        targets,
        epochs=fed.local_epochs,
        lr=fed.lr,
        batch_size=fed.batch_size,
        seed=fed.seed * 100_003 + round_ * 1009 + k,
    )
    return get_state(model), len(inputs)


def server_update(
    fed: Federation,
    algorithm: str,
    updates: list[tuple[int, State, int]],
    round_: int,
) -> list[State]:
    """The new global state of every group from (client, state, samples) updates."""
    new: list[State] = []
    for g in range(len(fed.specs)):
        mine = [(s, n) for k, s, n in updates if fed.client_group[k] == g]
        new.append(fedavg([s for s, _ in mine], [n for _, n in mine]))
    if algorithm == "fedavg":
        return new
    # FedDF: every client model, whatever its architecture, votes in the teacher's mean logits
    clients = []
    for k, state, _ in updates:
        model = build_model(fed.specs[fed.client_group[k]], fed.input_shape, fed.num_outputs)
        model.load_state_dict(state)
        clients.append(model.eval())
    teacher = ensemble_logits(clients, fed.transfer)
    for g, state in enumerate(new):
        model = build_model(fed.specs[g], fed.input_shape, fed.num_outputs)
        model.load_state_dict(state)
        distill_server(
            model,
            teacher,
            fed.transfer,
            *fed.val,
            steps=fed.server_steps,
            lr=fed.server_lr,
            temperature=fed.temperature,
            batch_size=fed.batch_size,
            seed=fed.seed * 100_003 + round_,
        )
        new[g] = get_state(model)
    return new


def run_rounds(
    fed: Federation, algorithm: str, folder: Path, resume: bool, say=None
) -> list[dict[str, Any]]:
    """Every round of `algorithm` into folder/round_NNN/; returns one record per round:
    {"round", "accuracy": [per group], "bytes_up": [per client], "bytes_down": [per client]}."""
    assert algorithm in ALGORITHMS, algorithm
    states = [get_state(build_seeded(fed, g, fed.seed)) for g in range(len(fed.specs))]
    history: list[dict[str, Any]] = []
    for r in range(1, fed.rounds + 1):
        phase = folder / f"round_{r:03d}"
        if resume and is_complete(phase):
            states = [get_state(load_model(phase / f"group_{g}")[0]) for g in range(len(fed.specs))]
            history.append(_read_record(phase))
            continue
        updates = []
        for k in range(len(fed.shards)):
            state, n = client_update(fed, k, states[fed.client_group[k]], r)
            updates.append((k, state, n))
        states = server_update(fed, algorithm, updates, r)
        record = {"round": r, "accuracy": [], "bytes_up": [], "bytes_down": []}
        for g, state in enumerate(states):
            model = build_model(fed.specs[g], fed.input_shape, fed.num_outputs)
            model.load_state_dict(state)
            record["accuracy"].append(accuracy(model, *fed.test))
            save_model(
                model,
                fed.specs[g],
                phase / f"group_{g}",
                input_shape=list(fed.input_shape),
                num_outputs=fed.num_outputs,
            )
        for k in range(len(fed.shards)):
            size = state_bytes(states[fed.client_group[k]])
            record["bytes_up"].append(size)  # weights up (FedAvg and FedDF alike) ...
            record["bytes_down"].append(size)  # ... and the group's global model down
        mark_complete(phase, record)
        history.append(record)
        if say is not None:
            accs = ", ".join(f"{a:.3f}" for a in record["accuracy"])
            say(f"{algorithm} round {r}/{fed.rounds}: test accuracy {accs}")
    return history


def _read_record(phase: Path) -> dict[str, Any]:
    import json

    return json.loads((phase / "done.json").read_text())


def train_alone(
    fed: Federation,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    group: int,
    folder: Path,
    resume: bool,
    seed: int,
) -> float:
    """One model trained for every round's epochs on (inputs, targets) alone, into `folder`
    (a client's local-only model, or the centralised upper bound): its test accuracy."""
    if resume and is_complete(folder):
        return float(_read_record(folder)["accuracy"])
    model = build_seeded(fed, group, fed.seed)
    local_train(
        model,
        inputs,
        targets,
        epochs=fed.rounds * fed.local_epochs,
        lr=fed.lr,
        batch_size=fed.batch_size,
        seed=seed,
    )
    score = accuracy(model, *fed.test)
    save_model(
        model,
        fed.specs[group],
        folder,
        input_shape=list(fed.input_shape),
        num_outputs=fed.num_outputs,
    )
    mark_complete(folder, {"accuracy": score, "samples": len(inputs)})
    return score
