"""Deploying a student: safetensors + config, torch.export and ONNX files, each checked against the
PyTorch model on real inputs, optional int8 ONNX, and a manifest of what was written.

    export_model(model, example_inputs, out_dir, ...)   any nn.Module
    export_run(run_dir, out_dir=None, int8=False, ...)  a run folder's distilled student
    export_model_folder(folder, out_dir=None, ...)      any saved stillroom model folder

onnx, onnxruntime and onnxscript (the `export` extra) are imported only when exporting.
"""

from stillroom.export.formats import EXPORT_FILES, TOLERANCE, ExportResult, Tolerance, export_model
from stillroom.export.run import export_model_folder, export_run
from stillroom.export.run_folder import RunFolder, open_run, task_metric

__all__ = [
    "EXPORT_FILES",
    "TOLERANCE",
    "ExportResult",
    "RunFolder",
    "Tolerance",
    "export_model",
    "export_model_folder",
    "export_run",
    "open_run",
    "task_metric",
]
