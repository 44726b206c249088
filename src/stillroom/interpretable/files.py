"""An interpretable student's folder, and its ONNX export.

    <student>/model.skops    the scikit-learn estimator (skops: no pickle; only scikit-learn
                             types inside, so loading trusts nothing else)
    <student>/student.json   kind, how it was fitted, feature and class names, the per-feature
                             training range (the inputs a bare folder's parity check draws from)
    <student>/rules.txt      the model as text: the tree's if/else, the rule list, the weights

`export_sklearn_folder` converts model.skops with skl2onnx into model.onnx and checks it: the
class scores onnxruntime gives must match the estimator's within the tolerance of every export,
on a run's test inputs (or, for a bare folder, seeded inputs drawn inside the training range).
The manifest has the shape of `stillroom.export`'s, so `stillroom export` prints it the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json, atomic_write_text

SKLEARN_MODEL = "model.skops"
STUDENT_JSON = "student.json"
RULES = "rules.txt"
ONNX_FILE, MANIFEST = "model.onnx", "manifest.json"
CHECK_SAMPLES = 256


def save_student(estimator: Any, folder: Path, info: dict[str, Any], rules: str) -> None:
    import skops.io as sio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SKLEARN_MODEL}.tmp"
    sio.dump(estimator, tmp)
    tmp.replace(folder / SKLEARN_MODEL)
    atomic_write_text(folder / RULES, rules + "\n")
    atomic_write_json(folder / STUDENT_JSON, info)


def load_student(folder: Path) -> tuple[Any, dict[str, Any]]:
    """(estimator, student.json) of a student folder; refuses any type scikit-learn does not
    define (see stillroom.models.external)."""
    from stillroom.models.external import _load_skops

    folder = Path(folder)
    info_path = folder / STUDENT_JSON
    if not info_path.is_file():
        raise StillroomError(
            f"{folder} holds no {STUDENT_JSON}; it is not an interpretable student"
        )
    try:
        info = json.loads(info_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StillroomError(f"{info_path} is damaged; rerun the run that wrote it") from None
    return _load_skops(folder / SKLEARN_MODEL), info


def to_onnx(estimator: Any, features: int) -> Any:
    """The estimator as an ONNX model: input "input" (batch, features) float32; a classifier's
    outputs are its label and its probabilities as a plain tensor (no ZipMap)."""
    from skl2onnx import to_onnx as convert
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    options = {id(estimator): {"zipmap": False}} if is_classifier(estimator) else None
    return convert(
        estimator,
        initial_types=[("input", FloatTensorType([None, features]))],
        options=options,
        target_opset={"": 18, "ai.onnx.ml": 3},
    )


def onnx_scores(path: Path, x: np.ndarray) -> np.ndarray:
    """(N, C) class scores from the ONNX file: probabilities, or the regression outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.asarray(x, dtype=np.float32)})
    out = outputs[-1] if len(outputs) > 1 else outputs[0]  # classifier: (label, probabilities)
    return np.asarray(out, dtype=np.float64).reshape(len(x), -1)


def export_sklearn_folder(
    folder: Path,
    out_dir: Path | None = None,
    force: bool = False,
    check_inputs: np.ndarray | None = None,
    formats: tuple[str, ...] | list[str] | None = None,
    int8: bool = False,
    source: dict[str, Any] | None = None,
) -> Any:
    """model.skops -> out_dir/model.onnx (default folder/export), parity checked; returns an
    `ExportResult` like every export. check_inputs: (N, F) inputs in the user's units."""
    from stillroom.export.formats import TOLERANCE, ExportResult
    from stillroom.interpretable.students import scores

    folder = Path(folder)
    if int8:
        raise StillroomError(
            "--int8 quantises matrix multiplications; an interpretable student has none to "
            "quantise: drop --int8"
        )
    if formats and tuple(formats) != ("onnx",):
        raise StillroomError(
            f"an interpretable student (scikit-learn) exports to onnx only, not "
            f"{', '.join(f for f in formats if f != 'onnx')}; pass --format onnx or no --format"
        )
    estimator, info = load_student(folder)
    features = int(info["features"])
    split = "test"
    if check_inputs is None:  # a bare folder: seeded inputs spread over the training range
        low, high = np.asarray(info["input_min"]), np.asarray(info["input_max"])
        rng = np.random.default_rng(0)
        check_inputs = low + rng.random((CHECK_SAMPLES, features)) * (high - low)
        split = f"{CHECK_SAMPLES} random inputs within the training range"
    check = np.asarray(check_inputs, dtype=np.float32).reshape(len(check_inputs), -1)
    out = Path(out_dir) if out_dir is not None else folder / "export"
    _prepare(out, force)
    try:
        model = to_onnx(estimator, features)
    except Exception as err:  # skl2onnx raises many types for estimators it cannot convert
        raise StillroomError(
            f"skl2onnx cannot convert the {type(estimator).__name__} in {folder} "
            f"({type(err).__name__}: {str(err).strip()[:200]})"
        ) from None
    atomic_write_bytes(out / ONNX_FILE, model.SerializeToString())
    shutil.copyfile(folder / SKLEARN_MODEL, out / SKLEARN_MODEL)
    reference = scores(estimator, check)
    exported = onnx_scores(out / ONNX_FILE, check)
    single = onnx_scores(out / ONNX_FILE, check[:1])
    diff = float(max(np.abs(exported - reference).max(), np.abs(single - reference[:1]).max()))
    allowed = TOLERANCE.atol + TOLERANCE.rtol * float(np.abs(reference).max())
    agreement = float((exported.argmax(1) == reference.argmax(1)).mean())
    files = {
        name: {
            "bytes": (out / name).stat().st_size,
            "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
        }
        for name in (ONNX_FILE, SKLEARN_MODEL)
    }
    manifest = {
        "format_version": 1,
        "source": source or {"model_dir": str(folder.resolve()), "split": split},
        "model": {"class": type(estimator).__name__, "kind": info["kind"], **info["size"]},
        "inputs": [{"name": "input", "shape": ["batch", features], "dtype": "float32"}],
        "outputs": [{"name": "scores", "shape": ["batch", len(info["classes"])]}],
        "parity": {
            "checked_samples": len(check),
            "tolerance": {"atol": TOLERANCE.atol, "rtol": TOLERANCE.rtol, "allowed": allowed},
            "formats": {
                "onnx": {
                    "max_abs_diff": diff,
                    "allowed": allowed,
                    "passed": diff <= allowed,
                    "runtime": "onnxruntime, CPU (skl2onnx conversion)",
                    "top1_agreement": agreement,
                }
            },
            "note": "max |onnx - scikit-learn| class scores over the check inputs and over the "
            "first one alone; scikit-learn compares in float32 as the ONNX tree ops do",
        },
        "int8": None,
        "files": files,
        "versions": _versions(),
        "passed": diff <= allowed,
    }
    atomic_write_json(out / MANIFEST, manifest)
    if diff > allowed:
        raise StillroomError(
            f"the ONNX export of {folder} differs from scikit-learn by up to {diff:.3g}, more than "
            f"{allowed:.3g}, on {len(check)} inputs; the files are in {out} for inspection"
        )
    return ExportResult(out, manifest)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _prepare(out: Path, force: bool) -> None:
    ours = (ONNX_FILE, SKLEARN_MODEL, MANIFEST)
    if out.exists() and not out.is_dir():
        raise StillroomError(f"{out} is a file; choose a folder for the export with --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise StillroomError(
                f"export folder {out} already exists; pass --force to replace it or choose "
                "another --out"
            )
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise StillroomError(
                f"--force only replaces an export folder, and {out} also holds "
                f"{', '.join(foreign[:3])}; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("scikit-learn", "skl2onnx", "onnxruntime", "skops")}
