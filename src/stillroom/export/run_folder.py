"""Reading a finished run folder back: its recipe, its test split and its saved models.

`export_run` and `build_report` both start here, so a bad RUN_DIR gets the same one-line message
from either command. Nothing here imports onnx or onnxruntime: the report works without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from stillroom.config import Recipe, load_recipe
from stillroom.data import ArrayData
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.models import load_model
from stillroom.pipeline import ROLES, prepare_data
from stillroom.train.evaluate import METRICS


@dataclass(frozen=True)
class RunFolder:
    """A finished run: `roles` lists the saved models present, in pipeline order."""

    path: Path
    recipe: Recipe
    test: ArrayData
    roles: tuple[str, ...]

    @property
    def task(self) -> str:
        return self.test.task

    @property
    def metric(self) -> str:
        return METRICS[self.task][0]

    def load(self, role: str) -> tuple[nn.Module, dict]:
        """(module in eval mode, its model.json) for one of `roles`."""
        assert role in self.roles, role
        model, meta = load_model(self.path / role)
        return model.eval(), meta


def open_run(run_dir: Path, required: tuple[str, ...] = ("student_kd",)) -> RunFolder:
    """Check that `run_dir` is a finished stillroom run holding the `required` models, and rebuild
    its test split from config.yaml (the split is a pure function of the recipe and its seed)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise StillroomError(f"run folder {run_dir} does not exist; check the path")
    if not run_dir.is_dir():
        raise StillroomError(f"{run_dir} is a file; give the run folder that holds config.yaml")
    if not (run_dir / "config.yaml").is_file():
        if (run_dir / "demo.json").is_file():
            settings = ", ".join(
                str(p.parent) for p in sorted(run_dir.glob("*/config.yaml"))
            ) or str(run_dir / "all_labels")
            raise StillroomError(
                f"{run_dir} is a `stillroom demo` folder holding several runs; point at one of "
                f"them: {settings}"
            )
        raise StillroomError(
            f"{run_dir} is not a stillroom run folder: it holds no config.yaml; give the folder "
            "`stillroom distill` wrote (its --out)"
        )
    method = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("method", "classic")
    if method != "classic":
        # a finished run of another method is read from its summary.json (export/run.py,
        # report/build.py); without one it has not finished
        raise StillroomError(
            f"{run_dir} is a '{method}' run that has not finished (no summary.json); rerun it "
            f"with `stillroom distill {run_dir}/config.yaml --out {run_dir} --resume`, or export "
            f"one of its model folders: `stillroom export {run_dir}/<folder>`"
        )
    roles = tuple(role for role in ROLES if (run_dir / role / "model.json").is_file())
    missing = [role for role in required if role not in roles]
    if missing:
        wanted = ", ".join(f"{role}/model.json" for role in missing)
        raise StillroomError(
            f"{run_dir} holds no {wanted}: the run has not finished; rerun it with "
            f"`stillroom distill ... --out {run_dir} --resume`"
        )
    recipe = load_recipe(run_dir / "config.yaml")
    splits, _ = prepare_data(recipe)
    return RunFolder(run_dir, recipe, splits.test, roles)


def task_metric(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> float:
    """Accuracy of (N, C) logits against (N,) class ids, or RMSE of (N, D) outputs against (N,) or
    (N, D) targets, over the labelled samples only (IGNORE_INDEX / NaN mark missing labels)."""
    if task == "classification":
        keep = targets != IGNORE_INDEX
        return (outputs[keep].argmax(1) == targets[keep]).float().mean().item()
    outputs = outputs.reshape(targets.shape)
    keep = ~torch.isnan(targets)
    return math.sqrt(((outputs[keep] - targets[keep]) ** 2).mean().item())
