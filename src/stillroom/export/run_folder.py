"""Reading a finished run folder back: its recipe, its test split and its saved models.

`export_run` and `build_report` both start here, so a bad RUN_DIR gets the same one-line message
from either command. Nothing here imports onnx or onnxruntime: the report works without them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from stillroom.config import Recipe, validate_recipe
from stillroom.data import ArrayData
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.models import load_model
from stillroom.pipeline import ROLES, prepare_data
from stillroom.train.evaluate import METRICS
from stillroom.yaml_safe import safe_yaml


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


MAX_RUN_FILE = 64 * 2**20
"""The largest config.yaml / JSON file of a run folder read: any bigger is not stillroom's."""


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of a run-folder file, one line when it is not one (too big, binary)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise StillroomError(f"{path} is not a plain file; the {what} is damaged")
    if path.stat().st_size > MAX_RUN_FILE:
        raise StillroomError(f"{path} is {path.stat().st_size:,} bytes; the {what} is damaged")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise StillroomError(f"{path} is not UTF-8 text; the {what} is damaged") from None


def read_json_file(path: Path, what: str = "run folder") -> Any:
    """A run folder's JSON file, one line naming it when it does not parse."""
    try:
        return json.loads(read_text_file(path, what))
    except (ValueError, RecursionError) as err:
        raise StillroomError(
            f"{path} is not valid JSON ({str(err)[:120]}); the {what} is damaged"
        ) from None


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.yaml as a mapping (bounded YAML: see stillroom.yaml_safe), one line
    when it is not one."""
    path = Path(run_dir) / "config.yaml"
    try:
        tree = safe_yaml(read_text_file(path, "run folder"), str(path))
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "cannot be parsed"
        raise StillroomError(
            f"{path}: invalid YAML ({problem}); the run folder is damaged"
        ) from None
    if not isinstance(tree, dict):
        raise StillroomError(
            f"{path} must be a mapping of recipe sections, got {type(tree).__name__}; the run "
            "folder is damaged"
        )
    return tree


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
    method = read_run_config(run_dir).get("method", "classic")
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
    # the recipe validated, never resolved: a factory it names is not imported (see models)
    recipe = validate_recipe(read_run_config(run_dir), str(run_dir / "config.yaml"), Recipe)
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
