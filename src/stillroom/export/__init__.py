"""Deploying a student: the files of FORMATS (safetensors + config, torch.export, ONNX), each
checked against the PyTorch model on real inputs, optional int8 ONNX, and a manifest of what was
written.

    export_model(model, example_inputs, out_dir, formats=..., ...)  any nn.Module
    export_run(run_dir, out_dir=None, int8=False, ...)              a run folder's distilled student
    export_model_folder(folder, out_dir=None, ...)                  any saved stillroom model folder
    export_transformers_folder(folder, out_dir=None, ...)           a transformers student -> ONNX
    export_path(path, ...)                                          whichever of the three `path` is

onnx, onnxruntime and onnxscript (the `export` extra) are imported only when exporting.
"""

from stillroom.export.formats import (
    EXPORT_FILES,
    FORMATS,
    TOLERANCE,
    ExportResult,
    Format,
    FormatName,
    Signature,
    Tolerance,
    export_model,
)
from stillroom.export.run import export_model_folder, export_path, export_run
from stillroom.export.run_folder import RunFolder, open_run, task_metric
from stillroom.export.transformers_folder import export_transformers_folder

__all__ = [
    "EXPORT_FILES",
    "FORMATS",
    "TOLERANCE",
    "ExportResult",
    "Format",
    "FormatName",
    "RunFolder",
    "Signature",
    "Tolerance",
    "export_model",
    "export_model_folder",
    "export_path",
    "export_run",
    "export_transformers_folder",
    "open_run",
    "task_metric",
]
