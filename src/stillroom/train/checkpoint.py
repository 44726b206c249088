"""Training checkpoints: safetensors for tensors, JSON for everything else, never a pickle.

Layout under `<run>/checkpoints/`:
    epoch-0007/model.safetensors      student weights (loadable as the student alone)
    epoch-0007/objective.safetensors  learned parts of the objective (projectors), when there are any
    epoch-0007/critics.safetensors    adversarial discriminators and their optimizer, when there are any
    epoch-0007/optimizer.safetensors  optimizer tensors (moments, steps) and the torch RNG state
    epoch-0007/state.json             optimizer scalars and param groups, scheduler, epoch, step,
                                      early-stopping state, metric history
    latest.json                       {"dir": "epoch-0007"}: the checkpoint to resume from

A checkpoint folder is written under a temporary name and renamed when complete; `latest.json` is
then replaced atomically and older folders are removed. A crash at any moment leaves `latest.json`
pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors, atomic_write_json

LATEST = "latest.json"


def _optimizer_split(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors keyed "state.<param>.<name>", JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    objective: nn.Module | None = None,
    critics: nn.Module | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write the checkpoint after `epoch` (1-based count of finished epochs); returns its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    tmp.mkdir()
    atomic_save_tensors(model.state_dict(), tmp / "model.safetensors")
    if objective is not None and len(objective.state_dict()) > 0:
        atomic_save_tensors(objective.state_dict(), tmp / "objective.safetensors")
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    opt_tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    full_state = {
        **state,
        "epoch": epoch,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
    }
    if critics is not None and critic_optimizer is not None:
        critic_tensors, full_state["critic_optimizer"] = _optimizer_split(
            critic_optimizer.state_dict()
        )
        critic_tensors.update({f"model.{k}": v for k, v in critics.state_dict().items()})
        atomic_save_tensors(critic_tensors, tmp / "critics.safetensors")
    atomic_write_json(tmp / "state.json", full_state)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_json(root / LATEST, {"dir": name, "epoch": epoch})
    for old in root.glob("epoch-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `latest.json` points at, or None when there is no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(root) / json.loads(pointer.read_text())["dir"]
    if not (folder / "state.json").is_file():
        raise StillroomError(
            f"checkpoint {folder} named by {pointer} is missing or incomplete; "
            "start a new run folder (or remove the checkpoints folder to start over)"
        )
    return folder


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    objective: nn.Module | None = None,
    critics: nn.Module | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG in place; returns the saved training state."""
    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if objective is not None and len(objective.state_dict()) > 0:
        objective.load_state_dict(load_file(str(folder / "objective.safetensors")))
    opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(opt_tensors.pop("rng.torch"))
    optimizer.load_state_dict(_optimizer_join(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if critics is not None and critic_optimizer is not None:
        if not (folder / "critics.safetensors").is_file():
            raise StillroomError(
                f"checkpoint {folder} holds no adversarial critics: the objective changed since it "
                "was written; resume with the same terms, or start a new run folder"
            )
        tensors = load_file(str(folder / "critics.safetensors"))
        critics.load_state_dict(
            {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        )
        critic_optimizer.load_state_dict(
            _optimizer_join(
                {k: v for k, v in tensors.items() if k.startswith("state.")},
                state["critic_optimizer"],
            )
        )
    return state
