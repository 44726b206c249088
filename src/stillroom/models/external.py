"""Teachers trained in other frameworks, as frozen nn.Modules with no trainable parameters.

`OnnxModule` runs a graph exported to ONNX (from PyTorch, TensorFlow, JAX, scikit-learn via
skl2onnx...) with onnxruntime on the CPU; `SklearnModule` runs a scikit-learn style estimator
saved with skops (never a pickle). Both map (N, *input_shape) float tensors to (N, num_outputs)
float32 tensors on the input's device, so the loop and the cache treat them like any teacher;
`check_fits` compares them with the data before any work starts.
"""

from __future__ import annotations

import importlib
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stillroom.errors import StillroomError

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
"""ONNX input element types a teacher may declare, and the numpy dtype fed to each."""

PROBABILITY_FLOOR = 1e-12
"""predict_proba is clipped here before the log: a zero probability would be a -inf logit."""


class OnnxModule(nn.Module):
    """A model exported to ONNX from any framework, run by onnxruntime on the CPU.

    forward(x: (N, *input_shape) tensor) -> (N, num_outputs) float32 tensor: the graph's first
    output, on x's device. x is fed as the dtype the graph's input declares. The module has no
    parameters; `parameter_count` counts the elements of the graph's initializers (its weights).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        onnx, ort = _onnx_tools()
        if not self.path.is_file():
            raise StillroomError(f"ONNX teacher {self.path} does not exist; check the path")
        try:
            graph = onnx.load(str(self.path), load_external_data=False).graph
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: no optimizer notices on stderr
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnx and onnxruntime raise their own types for bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StillroomError(
                f"cannot read {self.path} as an ONNX model ({first}); is it a complete .onnx file?"
            ) from None
        self.parameter_count = sum(math.prod(t.dims) for t in graph.initializer)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise StillroomError(
                f"ONNX teacher {self.path} takes {len(inputs)} inputs ({names}); stillroom feeds "
                "one tensor: export a graph with a single input"
            )
        self.input_name = inputs[0].name
        if inputs[0].type not in _ONNX_DTYPES:
            raise StillroomError(
                f"ONNX teacher {self.path} takes {inputs[0].type} input; supported: "
                f"{', '.join(_ONNX_DTYPES)}"
            )
        self.input_dtype = _ONNX_DTYPES[inputs[0].type]
        dims = inputs[0].shape
        # symbolic dims come back as strings (or None): any size fits there
        self.input_shape: tuple[int | None, ...] | None = (
            None if dims is None else tuple(d if isinstance(d, int) else None for d in dims[1:])
        )

    def extra_repr(self) -> str:
        return f"{self.path.name}, input_shape={self.input_shape}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, *input_shape) -> (N, num_outputs) float32; 1-D outputs become (N, 1)."""
        feed = x.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        out = np.asarray(self.session.run(None, {self.input_name: feed})[0])
        out = out.reshape(len(out), -1) if out.ndim == 1 else out
        return torch.from_numpy(out.astype(np.float32, copy=False)).to(x.device)

    def check_fits(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        """StillroomError unless the data's per-sample `input_shape` fits the graph's declared
        input (static dims) and a forward pass on 2 zero samples gives `num_outputs` columns."""
        declared = self.input_shape
        shape = tuple(input_shape)
        if declared is not None and (
            len(declared) != len(shape)
            or any(d is not None and d != s for d, s in zip(declared, shape, strict=True))
        ):
            raise StillroomError(
                f"ONNX teacher {self.path} takes inputs of shape {_dims(declared)} per sample but "
                f"the data's are {shape}; use the data the teacher was exported for, or re-export it"
            )
        try:
            with torch.inference_mode():
                out = self(torch.zeros(2, *shape))
        except Exception as err:  # onnxruntime's own error types for shape clashes inside the graph
            raise StillroomError(
                f"ONNX teacher {self.path} cannot run on inputs of shape {shape}: "
                f"{_last_line(err)}; use the data the teacher was exported for"
            ) from None
        if tuple(out.shape[1:]) != (num_outputs,):
            raise StillroomError(
                f"ONNX teacher {self.path} gives outputs of shape {tuple(out.shape[1:])} per sample "
                f"but the data has {num_outputs} outputs; its first output must be the logits "
                "(or predictions) for these classes"
            )


class SklearnModule(nn.Module):
    """A scikit-learn style estimator saved with skops (never pickle), as a frozen module.

    forward(x: (N, *input_shape)) -> float32 tensor on x's device, inputs flattened to (N, -1)
    float64: task "classification" gives log(predict_proba) clipped at PROBABILITY_FLOOR, so that
    softmax gives the probabilities back, (N, C) with column i the class `classes[i]`; task
    "regression" gives predict as (N, 1) (or (N, targets) for a multi-output regressor).

    Loading trusts only what skops trusts by default plus classes scikit-learn itself defines
    (fitted trees, `sklearn.tree._tree.Tree`, are not on skops' default list); anything else in
    the file (a custom class, a function outside scikit-learn) is refused, not loaded.

    parameter_count: total tree nodes for tree models and ensembles (sum of tree_.node_count;
    nodes of each HistGradientBoosting predictor), coef_ + intercept_ sizes for linear models,
    summed over a Pipeline's steps, 0 for anything else.
    """

    def __init__(self, path: Path, task: str, classes: list[str] | None = None) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise StillroomError(
                f"a scikit-learn teacher serves task classification or regression, not {task!r}"
            )
        self.path, self.task = Path(path), task
        self.estimator = _load_skops(self.path)
        self.order: list[int] | None = None  # predict_proba column for each data class
        if task == "classification":
            if not hasattr(self.estimator, "predict_proba"):
                raise StillroomError(
                    f"{self.path.name} holds a {type(self.estimator).__name__}, which has no "
                    "predict_proba; a classification teacher needs probabilities (e.g. SVC needs "
                    "probability=True), or use task regression"
                )
            mine = [str(c) for c in self.estimator.classes_]
            if classes is not None:
                wanted = [str(c) for c in classes]
                if sorted(mine) != sorted(wanted):
                    raise StillroomError(
                        f"{self.path.name} was fitted on classes {mine} but the data has "
                        f"{wanted}; fit the teacher on the data's labels"
                    )
                self.order = [mine.index(c) for c in wanted]
        self.parameter_count = _count_parameters(self.estimator)

    def extra_repr(self) -> str:
        return f"{type(self.estimator).__name__} from {self.path.name}, task={self.task}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().cpu().reshape(len(x), -1).numpy().astype(np.float64)
        if self.task == "classification":
            proba = np.asarray(self.estimator.predict_proba(flat))
            proba = proba if self.order is None else proba[:, self.order]
            out = np.log(np.clip(proba, PROBABILITY_FLOOR, None))
        else:
            out = np.asarray(self.estimator.predict(flat)).reshape(len(flat), -1)
        return torch.from_numpy(out.astype(np.float32)).to(x.device)

    def check_fits(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        """StillroomError unless the estimator was fitted on prod(input_shape) features and
        gives `num_outputs` columns."""
        features = math.prod(input_shape)
        fitted = getattr(self.estimator, "n_features_in_", None)  # absent on some third-party ones
        if fitted is not None and fitted != features:
            raise StillroomError(
                f"{self.path.name} was fitted on {fitted} features but the data's inputs "
                f"{tuple(input_shape)} flatten to {features}; fit the teacher on this data"
            )
        with torch.inference_mode():
            width = self(torch.zeros(2, *input_shape)).shape[1]
        if width != num_outputs:
            what = "classes" if self.task == "classification" else "targets"
            raise StillroomError(
                f"{self.path.name} gives {width} {what} but the data has {num_outputs}; fit the "
                "teacher on this data"
            )


def _onnx_tools() -> tuple[Any, Any]:
    """onnx and onnxruntime, imported only here: they are the optional `export` extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise StillroomError(
            f"an ONNX teacher needs onnx and onnxruntime ({err.name} is missing); install them "
            "with: pip install 'stillroom[export]'"
        ) from None
    return onnx, onnxruntime


def _load_skops(path: Path) -> Any:
    import skops.io as sio

    if not path.is_file():
        raise StillroomError(f"scikit-learn teacher {path} does not exist; check the path")
    if not zipfile.is_zipfile(path):
        raise StillroomError(
            f"{path.name} is not a skops file; stillroom never loads pickles: save it with "
            "skops.io.dump"
        )
    try:
        untrusted = sio.get_untrusted_types(file=path)
        refused = [name for name in untrusted if not _defined_by_sklearn(name)]
        if refused:
            raise StillroomError(
                f"{path.name} holds types stillroom does not trust: {', '.join(refused)}; loading "
                "it would need those trusted, so re-save a plain scikit-learn estimator"
            )
        return sio.load(path, trusted=untrusted)
    except StillroomError:
        raise
    except Exception as err:  # skops raises several types for a broken or foreign zip
        raise StillroomError(
            f"cannot read {path.name} as a skops file ({type(err).__name__}: {_last_line(err)}); "
            "save the estimator with skops.io.dump"
        ) from None


def _defined_by_sklearn(name: str) -> bool:
    """True for a class scikit-learn itself defines, e.g. "sklearn.tree._tree.Tree".

    The class must live in a sklearn module and say so in __module__, so a function, or a
    foreign class re-exported under a sklearn name, is still refused."""
    module_name, _, attribute = name.rpartition(".")
    if not module_name.startswith("sklearn."):
        return False
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return False
    return isinstance(value, type) and value.__module__ == module_name


def _count_parameters(estimator: Any) -> int:
    from sklearn.ensemble import BaseEnsemble
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import (
        BaseHistGradientBoosting,
    )
    from sklearn.pipeline import Pipeline
    from sklearn.tree import BaseDecisionTree

    if isinstance(estimator, Pipeline):
        return sum(_count_parameters(step) for _, step in estimator.steps)
    if isinstance(estimator, BaseDecisionTree):
        return int(estimator.tree_.node_count)
    if isinstance(estimator, BaseHistGradientBoosting):
        return sum(len(p.nodes) for row in estimator._predictors for p in row)
    if isinstance(estimator, BaseEnsemble):
        return sum(_count_parameters(member) for member in np.ravel(estimator.estimators_))
    coef = getattr(estimator, "coef_", None)  # every sklearn linear model; absent elsewhere
    if coef is not None:
        return int(np.size(coef) + np.size(getattr(estimator, "intercept_", 0)))
    return 0


def _dims(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _last_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1].strip() if lines else "(no message)"
