"""`export_path`: whatever `stillroom export PATH` is given, one of

export_run                  a classic run folder's distilled student, checked on its test split
(another method's run)      the student its summary.json names (`primary`), as the folder below
export_model_folder         any model folder stillroom saved (model.json: a student of any method)
export_transformers_folder  a transformers folder (config.json: encoder / causal LM students)
export_sklearn_folder       an interpretable student (student.json: scikit-learn -> skl2onnx)
"""

from __future__ import annotations

from pathlib import Path

import torch

from stillroom.config import read_recipe_tree, validate_recipe
from stillroom.data import ArrayData, prepare_splits, to_user_units
from stillroom.data.section import DataSection
from stillroom.errors import StillroomError
from stillroom.export.formats import FORMATS, TOLERANCE, ExportResult, Tolerance, export_model
from stillroom.export.run_folder import open_run
from stillroom.export.transformers_folder import (
    TRANSFORMERS_FORMATS,
    export_transformers_folder,
    is_transformers_folder,
)
from stillroom.interpretable.files import STUDENT_JSON, export_sklearn_folder
from stillroom.models import in_user_units, load_model
from stillroom.results import SUMMARY, Summary, read_summary

CHECK_SAMPLES = 256
PARITY_ROWS = 4096
"""Test samples the parity check reads when a run's test split is kept on disk."""


def export_path(
    path: Path,
    out_dir: Path | None = None,
    formats: tuple[str, ...] | list[str] | None = None,
    int8: bool = False,
    force: bool = False,
) -> tuple[str, ExportResult]:
    """Export what `path` holds: ("run" | "model" | "transformers", result). `formats`: FORMATS
    rows (default: every row for stillroom models, TRANSFORMERS_FORMATS for transformers)."""
    path = Path(path)
    if (path / STUDENT_JSON).is_file():  # an interpretable student: scikit-learn, via skl2onnx
        return "model", export_sklearn_folder(path, out_dir, force, formats=formats, int8=int8)
    if (path / "model.json").is_file() and not (path / "config.yaml").is_file():
        chosen = formats or tuple(FORMATS)
        return "model", export_model_folder(path, out_dir, int8, force, formats=chosen)
    if is_transformers_folder(path):
        chosen = formats or TRANSFORMERS_FORMATS
        return "transformers", export_transformers_folder(path, out_dir, chosen, int8, force)
    if (path / SUMMARY).is_file() and (summary := read_summary(path)).method != "classic":
        # another method's run: its summary names the student to ship
        folder = _primary_folder(path, summary)
        out = out_dir or path / "export"
        test = _test_split(path)
        if test is not None and (folder / STUDENT_JSON).is_file():
            test = to_user_units(test.head(PARITY_ROWS) if test.mapped else test)
            return "run", export_sklearn_folder(
                folder, out, force, test.inputs.reshape(len(test), -1).numpy(), formats, int8,
                {"run_dir": str(path.resolve()), "role": folder.relative_to(path).as_posix(),
                 "split": "test"},
            )  # fmt: skip
        if test is None or not (folder / "model.json").is_file():
            return export_path(folder, out, formats, int8, force)
        model, meta = load_model(folder, user_units=True)
        return "run", _export_checked_on(
            model, meta, to_user_units(test), out, formats or tuple(FORMATS), int8, force,
            TOLERANCE, {"run_dir": str(path.resolve()), "role": folder.relative_to(path).as_posix(),
                        "split": "test"},
        )  # fmt: skip
    if (
        path.is_dir()
        and not (path / "config.yaml").is_file()
        and not (path / "demo.json").is_file()
    ):
        raise StillroomError(
            f"{path} is neither a stillroom run folder (config.yaml), a stillroom model folder "
            "(model.json + model.safetensors) nor a transformers folder (config.json + "
            "model.safetensors); give the folder `stillroom distill` wrote, or one of its students"
        )
    return "run", export_run(path, out_dir, int8, force, formats=formats or tuple(FORMATS))


def _test_split(run_dir: Path) -> ArrayData | None:
    """The test split of an array method's run, rebuilt from its config.yaml (a pure function of
    the recipe and its seed); None where the method's data is not the data layer's (multi-task,
    text). The recipe is only validated: no factory it names is imported."""
    from stillroom.methods import METHODS

    tree, source = read_recipe_tree(run_dir / "config.yaml")
    method = METHODS.get(str(tree.get("method", "classic")))
    if method is None:
        return None
    recipe = validate_recipe(tree, source, method.schema)
    data = getattr(recipe, "data", None)
    if not isinstance(data, DataSection):
        return None
    return prepare_splits(data, recipe.seed).test


def _primary_folder(run_dir: Path, summary: Summary) -> Path:
    row = summary.model(summary.primary) if summary.primary else None
    if row is None or row.folder is None:
        saved = ", ".join(f"{run_dir / m.folder}" for m in summary.models if m.folder)
        raise StillroomError(
            f"{run_dir} ({summary.method}) names no saved student to export; export one of its "
            f"model folders: {saved or 'none saved'}"
        )
    return run_dir / row.folder


def export_run(
    run_dir: Path,
    out_dir: Path | None = None,
    int8: bool = False,
    force: bool = False,
    role: str = "student_kd",
    tolerance: Tolerance = TOLERANCE,
    formats: tuple[str, ...] | list[str] = tuple(FORMATS),
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
    return _export_checked_on(
        model,
        meta,
        to_user_units(run.test),
        Path(out_dir) if out_dir is not None else run.path / "export",
        formats,
        int8,
        force,
        tolerance,
        {"run_dir": str(run.path.resolve()), "role": role, "split": "test"},
    )


def _export_checked_on(
    model: torch.nn.Module,
    meta: dict,
    test: ArrayData,
    out: Path,
    formats: tuple[str, ...] | list[str],
    int8: bool,
    force: bool,
    tolerance: Tolerance,
    source: dict,
) -> ExportResult:
    """Export `model` with parity (and int8 accuracy) checked on a run's test split."""
    if test.mapped:
        # a test split kept on disk: parity on its first PARITY_ROWS samples, read into memory
        test = test.head(PARITY_ROWS)
    return export_model(
        model,
        (test.inputs[:2],),
        Path(out),
        check_inputs=(test.inputs,),
        targets=test.targets,
        task=test.task,
        config=meta,
        formats=formats,
        int8=int8,
        force=force,
        tolerance=tolerance,
        source=source,
    )


def export_model_folder(
    folder: Path,
    out_dir: Path | None = None,
    int8: bool = False,
    force: bool = False,
    tolerance: Tolerance = TOLERANCE,
    formats: tuple[str, ...] | list[str] = tuple(FORMATS),
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
    # a model with several heads (a dict of outputs) exports them as named outputs
    return export_model(
        model,
        (inputs[:2],),
        Path(out_dir) if out_dir is not None else folder / "export",
        check_inputs=(inputs,),
        config=meta,
        formats=formats,
        int8=int8,
        force=force,
        tolerance=tolerance,
        source={"model_dir": str(folder.resolve()), "split": f"{CHECK_SAMPLES} random inputs"},
    )
