"""`export_run`: the distilled student of a run folder, exported and checked on the run's test split."""

from __future__ import annotations

from pathlib import Path

from stillroom.export.formats import TOLERANCE, ExportResult, Tolerance, export_model
from stillroom.export.run_folder import open_run


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
    `stillroom.models.load_model(out_dir)` rebuilds the student from it.
    """
    run = open_run(Path(run_dir), required=(role,))
    model, meta = run.load(role)
    test = run.test
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
