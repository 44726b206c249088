"""`export_run`: the distilled student of a run folder, exported and checked on the run's test
split; `export_model_folder`: any model folder stillroom saved (a student of any method)."""

from __future__ import annotations

from pathlib import Path

import torch

from stillroom.data import to_user_units
from stillroom.errors import StillroomError
from stillroom.export.formats import TOLERANCE, ExportResult, Tolerance, export_model
from stillroom.export.run_folder import open_run
from stillroom.models import in_user_units, load_model

CHECK_SAMPLES = 256


def export_run(
    run_dir: Path,
    out_dir: Path | None = None,
    int8: bool = False,
    force: bool = False,
    role: str = "student_kd",
    tolerance: Tolerance = TOLERANCE,
) -> ExportResult:
    """Export `run_dir/role` (the student alone: no teacher, projector or discriminator is part of
    its saved module) into `out_dir` (default `run_dir/export`), checked on the test split.

    The folder's model.json is the run's own (spec, input_shape, num_outputs), so
    `stillroom.models.load_model(out_dir)` rebuilds the student from it; a student of
    standardised data is exported with its standardisation (inputs and predictions in the
    user's units).
    """
    run = open_run(Path(run_dir), required=(role,))
    # exported in the user's units: raw features in, predictions in the target's own units
    model, meta = in_user_units(*run.load(role))
    test = to_user_units(run.test)
    return export_model(
        model,
        (test.inputs[:2],),
        Path(out_dir) if out_dir is not None else run.path / "export",
        check_inputs=(test.inputs,),
        targets=test.targets,
        task=run.task,
        config=meta,
        int8=int8,
        force=force,
        tolerance=tolerance,
        source={"run_dir": str(run.path.resolve()), "role": role, "split": "test"},
    )


def export_model_folder(
    folder: Path,
    out_dir: Path | None = None,
    int8: bool = False,
    force: bool = False,
    tolerance: Tolerance = TOLERANCE,
) -> ExportResult:
    """Export a model folder written by stillroom (model.json + model.safetensors), e.g. a
    self-distilled exit, a chain generation or an ensemble member, into `out_dir` (default
    `folder/export`). A bare folder carries no data, so parity is checked on CHECK_SAMPLES seeded
    standard-normal inputs of the model's input shape (the manifest says so); export a classic
    run folder instead to check on its test split."""
    folder = Path(folder)
    model, meta = load_model(folder, user_units=True)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((CHECK_SAMPLES, *meta["input_shape"]), generator=generator)
    with torch.no_grad():
        outputs = model.eval()(inputs[:2])
    if not isinstance(outputs, torch.Tensor):
        raise StillroomError(
            f"{folder} holds a model with several outputs ({', '.join(outputs)}); export takes "
            "one output tensor: export each head or exit as its own model"
        )
    return export_model(
        model,
        (inputs[:2],),
        Path(out_dir) if out_dir is not None else folder / "export",
        check_inputs=(inputs,),
        config=meta,
        int8=int8,
        force=force,
        tolerance=tolerance,
        source={"model_dir": str(folder.resolve()), "split": f"{CHECK_SAMPLES} random inputs"},
    )
