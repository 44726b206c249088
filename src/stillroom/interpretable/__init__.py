"""Interpretable students (a tree, a rule list, a sparse linear model) fitted to a teacher or to
labels, their folders and their ONNX export; the workflow is stillroom.methods.interpretable."""

from stillroom.interpretable.files import export_sklearn_folder, load_student, save_student
from stillroom.interpretable.students import STUDENTS, Fitting, generate_near, scores

__all__ = [
    "STUDENTS",
    "Fitting",
    "export_sklearn_folder",
    "generate_near",
    "load_student",
    "save_student",
    "scores",
]
