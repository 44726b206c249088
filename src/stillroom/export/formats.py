"""Export one model for deployment, and check every export against eager PyTorch.

An export folder:

    model.safetensors + model.json   the weights and the config that rebuilds the module
    model.pt2                        a torch.export program (load with torch.export.load)
    model.onnx                       ONNX, one file, dynamic batch dimension (run with onnxruntime)
    model_int8.onnx                  with int8=True: MatMul/Gemm weights in int8 (onnxruntime)
    manifest.json                    files, sizes, sha256, parity diffs, tolerances, int8 metric;
                                     written last, so a folder without it is an interrupted export

Parity: each float32 export runs on the check inputs (a run's test split) and on its first sample
alone (the batch dimension really is dynamic); the largest absolute difference from the eager
model's outputs must stay within `Tolerance.allowed`, or `export_model` raises StillroomError.
The int8 file is not held to that tolerance (quantisation changes outputs by design): its max
difference, its task metric next to float32 and its top-1 agreement are reported instead.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from stillroom.errors import StillroomError
from stillroom.export.run_folder import task_metric
from stillroom.io import atomic_write_json
from stillroom.models import count_parameters, save_weights

WEIGHTS, CONFIG, PROGRAM, ONNX, ONNX_INT8, MANIFEST = (
    "model.safetensors",
    "model.json",
    "model.pt2",
    "model.onnx",
    "model_int8.onnx",
    "manifest.json",
)
EXPORT_FILES = (WEIGHTS, CONFIG, PROGRAM, ONNX, ONNX_INT8, MANIFEST)
CHUNK = 1024
"""Check inputs run through each runtime in chunks of this many samples, to bound memory."""


@dataclass(frozen=True)
class Tolerance:
    """Largest |export - eager| allowed: atol + rtol * max|eager output|.

    float32 exports reorder and fuse the same arithmetic (ONNX Gemm, fused attention), so they
    match eager PyTorch only up to rounding: about 1e-7 to 2e-5 on the logits of our reference
    models. atol=1e-4 leaves room for that; the rtol term scales the bound for outputs far from 1
    (unstandardised regression targets), where float32 rounding grows with the magnitude.
    """

    atol: float = 1e-4
    rtol: float = 1e-5

    def allowed(self, reference: torch.Tensor) -> float:
        return self.atol + self.rtol * reference.abs().max().item()


TOLERANCE = Tolerance()
"""The default parity bound of every export."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.out_dir / name for name in self.manifest["files"]}


def export_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    out_dir: Path,
    *,
    check_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    targets: torch.Tensor | None = None,
    task: str = "classification",
    config: dict[str, Any] | None = None,
    int8: bool = False,
    force: bool = False,
    tolerance: Tolerance = TOLERANCE,
    source: dict[str, Any] | None = None,
) -> ExportResult:
    """Export `model` (any nn.Module with tensor inputs and one tensor output) into `out_dir`.

    Args:
        model: the module; a copy without forward hooks (feature taps) is exported in eval mode
            on the CPU; `model` itself is left untouched.
        example_inputs: one batch, a tensor (N, ...) or a tuple of them (one per forward
            argument), used to trace the model; dimension 0 of every input becomes the dynamic
            batch dimension.
        check_inputs: the inputs the exports are compared on (default: `example_inputs`); use real
            data, e.g. a test split: random inputs miss the ranges a model actually sees.
        targets: labels for `check_inputs`; with int8, the task metric of float32 and int8 is
            reported.
        task: "classification" (accuracy, agreement) or "regression" (rmse).
        config: JSON-able description written to model.json (e.g. a stillroom model.json: spec,
            input_shape, num_outputs), so the weights can be rebuilt without guessing.
        int8: also write model_int8.onnx (dynamic int8 quantisation, onnxruntime).
        force: replace `out_dir` if it already holds an export.
        tolerance: the parity bound for the float32 exports.
        source: recorded in the manifest (e.g. the run folder and role exported).

    Returns the folder and its manifest. Raises StillroomError when an export's outputs differ
    from the eager model by more than the tolerance (the files stay, for inspection).
    """
    tools = onnx_tools()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, force)
    model = _bare_copy(model).eval().cpu()
    example_inputs = _as_tuple(example_inputs)
    example = tuple(_at_least_two(x) for x in example_inputs)
    check = _as_tuple(check_inputs) if check_inputs is not None else example_inputs
    names = ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    # one Dim shared by every input: they are batched together
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in example)

    reference = run_in_chunks(lambda *xs: _eager(model, *xs), check)
    first = tuple(x[:1] for x in check)

    # 1. weights + config; loaded back into a zeroed copy, so the file alone must carry every tensor
    save_weights(model, out_dir / WEIGHTS)
    class_name = f"{type(model).__module__}.{type(model).__qualname__}"
    atomic_write_json(out_dir / CONFIG, {"class": class_name, **(config or {})})
    reloaded = _zeroed_copy(model)
    reloaded.load_state_dict(load_file(str(out_dir / WEIGHTS)), strict=True)
    outputs = {"safetensors": run_in_chunks(lambda *xs: _eager(reloaded, *xs), check)}

    # 2. torch.export program, saved and loaded back: the parity is of the file, not the object
    with _quiet():
        program = torch.export.export(model, example, dynamic_shapes=dynamic_shapes)
        torch.export.save(program, out_dir / PROGRAM)
        loaded = torch.export.load(out_dir / PROGRAM).module()
    outputs["torch_export"] = run_in_chunks(lambda *xs: _eager(loaded, *xs), check)
    single = {"torch_export": _eager(loaded, *first)}

    # 3. ONNX through onnxruntime
    with _quiet():
        torch.onnx.export(
            model,
            example,
            str(out_dir / ONNX),
            dynamo=True,
            external_data=False,  # one self-contained file, as deployment tools expect
            dynamic_shapes=dynamic_shapes,
            input_names=names,
            output_names=["output"],
            verbose=False,
        )
    session = tools.session(out_dir / ONNX)
    outputs["onnx"] = run_in_chunks(lambda *xs: run_onnx(session, names, xs), check)
    single["onnx"] = run_onnx(session, names, first)

    allowed = tolerance.allowed(reference)
    parity = {}
    for fmt, out in outputs.items():
        diff = _max_abs_diff(out, reference)
        if fmt in single:
            diff = max(diff, _max_abs_diff(single[fmt], reference[:1]))
        parity[fmt] = {"max_abs_diff": diff, "allowed": allowed, "passed": diff <= allowed}

    int8_report = None
    if int8:
        tools.quantize(out_dir / ONNX, out_dir / ONNX_INT8)
        int8_session = tools.session(out_dir / ONNX_INT8)
        quantised = run_in_chunks(lambda *xs: run_onnx(int8_session, names, xs), check)
        int8_report = _int8_report(reference, quantised, targets, task)

    manifest = {
        "format_version": 1,
        "source": source or {},
        "model": {
            "class": class_name,
            "parameters": count_parameters(model),
        },
        "inputs": [
            {
                "name": n,
                "shape": ["batch", *x.shape[1:]],
                "dtype": str(x.dtype).removeprefix("torch."),
            }
            for n, x in zip(names, example, strict=True)
        ],
        "outputs": [{"name": "output", "shape": ["batch", *reference.shape[1:]]}],
        "parity": {
            "checked_samples": int(check[0].shape[0]),
            "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol, "allowed": allowed},
            "formats": parity,
            "note": "max |export - eager PyTorch| over the check inputs and over the first sample "
            "alone (batch 1); allowed = atol + rtol * max|eager output|",
        },
        "int8": int8_report,
        "files": _describe_files(out_dir),
        "versions": tools.versions(out_dir / ONNX),
        "passed": all(p["passed"] for p in parity.values()),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    failed = [fmt for fmt, p in parity.items() if not p["passed"]]
    if failed:
        worst = max(parity[fmt]["max_abs_diff"] for fmt in failed)
        raise StillroomError(
            f"{', '.join(failed)} export differs from the PyTorch model by up to {worst:.3g}, more "
            f"than the tolerance {allowed:.3g}, on {manifest['parity']['checked_samples']} inputs; "
            f"the files are in {out_dir} for inspection (see {MANIFEST})"
        )
    return ExportResult(out_dir, manifest)


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Never overwrite without --force; even then, only a folder that holds nothing but an export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise StillroomError(f"{out_dir} is a file; choose a folder for the export with --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise StillroomError(
                f"export folder {out_dir} already exists; pass --force to replace it or choose "
                "another --out"
            )
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            raise StillroomError(
                f"--force only replaces an export folder, and {out_dir} also holds "
                f"{', '.join(foreign[:3])}; choose another --out"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _as_tuple(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _at_least_two(x: torch.Tensor) -> torch.Tensor:
    # torch.export specialises a dimension of size 1 to a constant: trace with a batch of >= 2
    return x if x.shape[0] >= 2 else x[torch.arange(2) % x.shape[0]]


def _bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without forward hooks. Hooks are training gear (feature taps for
    hint and attention terms): they would drag what they point at (a teacher, a feature store)
    into the copy, and torch.export would trace their side effects into the deployed graph."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        # deepcopy returns the memo entry for an object it meets: each hook table becomes empty
        for table in (module._forward_hooks, module._forward_pre_hooks):
            memo[id(table)] = type(table)()
    return copy.deepcopy(model, memo)


def _zeroed_copy(model: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
    return fresh


@torch.no_grad()
def _eager(model: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    out = model(*inputs)
    if not isinstance(out, torch.Tensor):
        raise StillroomError(
            f"export needs a model that returns one tensor, got {type(out).__name__}; wrap it in "
            "a module whose forward returns the tensor to deploy"
        )
    return out.float()


def run_onnx(session: Any, names: list[str], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The "output" of an onnxruntime session fed `inputs` under `names`, as a float32 tensor."""
    feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
    return torch.from_numpy(np.asarray(session.run(["output"], feeds)[0])).float()


def run_in_chunks(
    run: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """run(*inputs) over (N, ...) inputs in chunks of CHUNK samples -> (N, ...) outputs."""
    n = inputs[0].shape[0]
    return torch.cat([run(*(x[i : i + CHUNK] for x in inputs)) for i in range(0, n, CHUNK)])


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise StillroomError(f"export output shape {tuple(a.shape)} != PyTorch's {tuple(b.shape)}")
    return (a - b).abs().max().item() if a.numel() else 0.0


def _int8_report(
    reference: torch.Tensor, quantised: torch.Tensor, targets: torch.Tensor | None, task: str
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "file": ONNX_INT8,
        "method": "onnxruntime.quantization.quantize_dynamic: MatMul/Gemm weights int8 per tensor, "
        "activations quantised to uint8 per batch at run time; other ops stay float32",
        "max_abs_diff": _max_abs_diff(quantised, reference),
    }
    if task == "classification":
        agreement = (quantised.argmax(1) == reference.argmax(1)).float().mean().item()
        report["top1_agreement_with_fp32"] = agreement
    if targets is not None:
        metric = "accuracy" if task == "classification" else "rmse"
        report["metric"] = metric
        report["fp32"] = task_metric(reference, targets, task)
        report["int8"] = task_metric(quantised, targets, task)
    return report


def _describe_files(out_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "bytes": (out_dir / name).stat().st_size,
            "sha256": hashlib.sha256((out_dir / name).read_bytes()).hexdigest(),
        }
        for name in EXPORT_FILES
        if (out_dir / name).is_file() and name != MANIFEST
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter that says nothing about this model: "torchvision is not
    installed" log lines and torch's own internal deprecation notices. Errors still raise, and
    other warnings still show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class OnnxTools:
    """onnx and onnxruntime, imported only when exporting: they are the optional `export` extra."""

    onnx: Any
    ort: Any

    def session(self, path: Path, threads: int | None = None) -> Any:
        """A CPU inference session; `threads` intra-op threads (None: onnxruntime's default)."""
        options = self.ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no optimizer notices on stderr
        if threads is not None:
            options.intra_op_num_threads = threads
        return self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def quantize(self, source: Path, target: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # shape inference + graph cleanup first, as onnxruntime recommends before quantising
        prepared = target.with_name(f".{target.name}.pre")
        try:
            quant_pre_process(str(source), str(prepared))
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        finally:
            prepared.unlink(missing_ok=True)

    def versions(self, onnx_path: Path) -> dict[str, Any]:
        model = self.onnx.load(str(onnx_path), load_external_data=False)
        opset = next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
        return {
            "torch": torch.__version__,
            "onnx": self.onnx.__version__,
            "onnxruntime": self.ort.__version__,
            "onnx_opset": opset,
        }


def onnx_tools() -> OnnxTools:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  torch.onnx.export(dynamo=True) needs it
    except ImportError as err:
        raise StillroomError(
            f"export needs onnx, onnxruntime and onnxscript ({err.name} is missing); install them "
            "with: pip install 'stillroom[export]'"
        ) from None
    return OnnxTools(onnx, onnxruntime)
