"""Export one model for deployment, and check every export against eager PyTorch.

FORMATS is the table of export formats: each row names the file it writes, the function that
writes it and the runtime that runs the file back for the parity check. An export folder holds
the rows asked for (all by default):

    model.safetensors + model.json   safetensors: the weights and the config that rebuilds the module
    model.pt2                        torch_export: a torch.export program (torch.export.load)
    model.onnx                       onnx: one file, dynamic batch dimension (onnxruntime)
    model_int8.onnx                  with int8=True: MatMul/Gemm weights in int8 (onnxruntime)
    manifest.json                    files, sizes, sha256, parity diffs, tolerances, int8 metric;
                                     written last, so a folder without it is an interrupted export

Parity: each float32 export runs on the check inputs (a run's test split) and on its first sample
alone, every other dynamic dim halved (those dims really are dynamic); the largest absolute
difference from the eager model's outputs must stay within `Tolerance.allowed`, or `export_model`
raises StillroomError. The int8 file is not held to that tolerance (quantisation changes outputs
by design): its max difference, its task metric next to float32 and its top-1 agreement are
reported instead.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file
from torch import nn

from stillroom.errors import StillroomError
from stillroom.export.run_folder import task_metric
from stillroom.export.runtime import onnx_tools, pack_outputs, quiet, run_in_chunks, run_onnx
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


@dataclass(frozen=True)
class Signature:
    """The forward arguments of an export: their names, which dims vary, the output's name.

    dynamic: per input, {dim: axis name}; inputs that share an axis name share one torch.export
    Dim (they are batched together); output_axes: the same for the output, for the manifest.
    output: the output's name, or the names of several (a model returning a dict, e.g. one head
    per task: the exports return those tensors, named, in this order).
    Default: one input "input" with a dynamic dim 0 "batch".
    """

    names: tuple[str, ...] = ("input",)
    dynamic: tuple[dict[int, str], ...] = ({0: "batch"},)
    output: str | tuple[str, ...] = "output"
    output_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})

    @property
    def outputs(self) -> list[str]:
        return [self.output] if isinstance(self.output, str) else list(self.output)

    @property
    def fetch(self) -> str | list[str]:
        """What `run_onnx` fetches: the one output as it is, or the list of several (packed)."""
        return self.output if isinstance(self.output, str) else list(self.output)

    @classmethod
    def batched(cls, count: int, outputs: tuple[str, ...] | None = None) -> Signature:
        """`count` inputs batched on dim 0: "input", or "input_0", "input_1", ...; one output
        "output", or the named `outputs` of a model that returns a dict."""
        names = ("input",) if count == 1 else tuple(f"input_{i}" for i in range(count))
        return cls(names, tuple({0: "batch"} for _ in names), outputs or "output")

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        dims = {name: torch.export.Dim(name) for axes in self.dynamic for name in axes.values()}
        return tuple({dim: dims[name] for dim, name in axes.items()} for axes in self.dynamic)

    def shrink(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The first sample alone, every other dynamic dim cut to half its length (at least 1):
        sizes never seen while tracing, so the exports prove those dims really are dynamic."""
        out = []
        for x, axes in zip(inputs, self.dynamic, strict=True):
            index: list[slice] = [slice(None)] * x.dim()
            for dim in axes:
                index[dim] = slice(0, 1 if dim == 0 else max(1, x.shape[dim] // 2))
            out.append(x[tuple(index)])
        return tuple(out)


@dataclass(frozen=True)
class ExportJob:
    """What every format's writer and reader get: the bare eval-mode CPU model, the traced example
    inputs (batch >= 2), the folder, the signature and the config written to model.json."""

    model: nn.Module
    example: tuple[torch.Tensor, ...]
    out_dir: Path
    signature: Signature
    config: dict[str, Any]

    @property
    def class_name(self) -> str:
        return f"{type(self.model).__module__}.{type(self.model).__qualname__}"


Runner = Callable[..., torch.Tensor]
"""runner(*inputs) -> the output of the exported file, as the eager model's."""


@dataclass(frozen=True)
class Format:
    """One row of FORMATS.

    files: what `write` puts in the export folder (the first is the format's own file);
    write(job): writes them; load(job) -> runner: reads the written file back with `runtime`, so
    the parity check is of the file, not of an object in memory.
    """

    files: tuple[str, ...]
    write: Callable[[ExportJob], None]
    load: Callable[[ExportJob], Runner]
    runtime: str
    label: str

    @property
    def file(self) -> str:
        return self.files[0]


def _write_safetensors(job: ExportJob) -> None:
    save_weights(job.model, job.out_dir / WEIGHTS)
    atomic_write_json(job.out_dir / CONFIG, {"class": job.class_name, **job.config})


def _load_safetensors(job: ExportJob) -> Runner:
    # loaded into a zeroed copy: the file alone must carry every tensor
    reloaded = _zeroed_copy(job.model)
    reloaded.load_state_dict(load_file(str(job.out_dir / WEIGHTS)), strict=True)
    return lambda *xs: _eager(reloaded, *xs)


class _NamedOutputs(nn.Module):
    """A model that returns a dict, returning its tensors as a tuple in the signature's order:
    what the tracing exporters write as several named outputs."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(*inputs)
        return tuple(out[name] for name in self.names)


def _traced(job: ExportJob) -> tuple[nn.Module, Any]:
    """The module the tracing exporters see, and its dynamic shapes."""
    shapes = job.signature.dynamic_shapes()
    if isinstance(job.signature.output, str):
        return job.model, shapes
    # forward(*inputs) takes its inputs as one tuple argument: so do its dynamic shapes
    return _NamedOutputs(job.model, job.signature.outputs), (shapes,)


def _write_torch_export(job: ExportJob) -> None:
    with quiet():
        module, shapes = _traced(job)
        program = torch.export.export(module, job.example, dynamic_shapes=shapes)
        torch.export.save(program, job.out_dir / PROGRAM)


def _load_torch_export(job: ExportJob) -> Runner:
    with quiet():
        loaded = torch.export.load(job.out_dir / PROGRAM).module()
    return lambda *xs: _eager(loaded, *xs)


def _write_onnx(job: ExportJob) -> None:
    signature = job.signature
    module, shapes = _traced(job)
    with quiet():
        torch.onnx.export(
            module,
            job.example,
            str(job.out_dir / ONNX),
            dynamo=True,
            external_data=False,  # one self-contained file, as deployment tools expect
            dynamic_shapes=shapes,
            input_names=list(signature.names),
            output_names=signature.outputs,
            opset_version=ONNX_OPSET,
            verbose=False,
        )


def _load_onnx(job: ExportJob) -> Runner:
    session = onnx_tools().session(job.out_dir / ONNX)
    names, fetch = list(job.signature.names), job.signature.fetch
    return lambda *xs: run_onnx(session, names, xs, fetch)


FORMATS: dict[str, Format] = {
    "safetensors": Format(
        (WEIGHTS, CONFIG),
        _write_safetensors,
        _load_safetensors,
        "PyTorch, weights loaded from the file into a zeroed copy",
        "safetensors",
    ),
    "torch_export": Format(
        (PROGRAM,), _write_torch_export, _load_torch_export, "torch.export.load", "torch.export"
    ),
    "onnx": Format((ONNX,), _write_onnx, _load_onnx, "onnxruntime, CPU", "onnx"),
}
"""Every export format, in the order they are written and shown."""

FormatName = Literal["safetensors", "torch_export", "onnx"]
"""The names of FORMATS, for signatures (a test holds the two together)."""
assert get_args(FormatName) == tuple(FORMATS)

ONNX_OPSET = 18
"""The opset every ONNX file is written in: onnxruntime >= 1.14 runs it (1.23 runs up to 23)."""

EXPORT_FILES = (*(f for row in FORMATS.values() for f in row.files), ONNX_INT8, MANIFEST)
"""Every file an export of a stillroom model may write."""


def check_formats(formats: tuple[str, ...] | list[str], int8: bool = False) -> tuple[str, ...]:
    """The asked formats, in table order; one-line errors for an unknown, empty or int8 without
    onnx choice."""
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise StillroomError(
            f"unknown export format {unknown[0]!r}; available: {', '.join(FORMATS)}"
        )
    if not formats:
        raise StillroomError(f"choose at least one export format: {', '.join(FORMATS)}")
    if int8 and "onnx" not in formats:
        raise StillroomError("--int8 quantises the ONNX file: add --format onnx")
    return tuple(name for name in FORMATS if name in formats)


def export_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    out_dir: Path,
    *,
    check_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    targets: torch.Tensor | None = None,
    task: str = "classification",
    config: dict[str, Any] | None = None,
    formats: tuple[str, ...] | list[str] = tuple(FORMATS),
    int8: bool = False,
    force: bool = False,
    tolerance: Tolerance = TOLERANCE,
    source: dict[str, Any] | None = None,
    signature: Signature | None = None,
    model_info: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> ExportResult:
    """Export `model` (any nn.Module with tensor inputs and one tensor output, or a dict of
    them, e.g. a head per task: each becomes a named output) into `out_dir`.

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
        task: "classification" (accuracy, agreement) or "regression" (rmse); "tokens" for
            (N, L, V) language-model logits (int8 agreement of the predicted token).
        config: JSON-able description written to model.json (e.g. a stillroom model.json: spec,
            input_shape, num_outputs), so the weights can be rebuilt without guessing.
        formats: names of FORMATS rows to write (default: all of them).
        int8: also write model_int8.onnx (dynamic int8 quantisation, onnxruntime); needs "onnx".
        force: replace `out_dir` if it already holds an export.
        tolerance: the parity bound for the float32 exports.
        source: recorded in the manifest (e.g. the run folder and role exported).
        signature: input names, dynamic dims and output name (default: inputs batched on dim 0,
            "input" / "input_0", ..., output "output").
        model_info: extra facts about the model for the manifest (e.g. its architecture).
        extra_files: {name in the export folder: file to copy there}, e.g. a tokenizer's files
            that make the folder deployable; listed in the manifest with the exports.

    Returns the folder and its manifest. Raises StillroomError when an export's outputs differ
    from the eager model by more than the tolerance (the files stay, for inspection).
    """
    formats = check_formats(formats, int8)
    tools = onnx_tools()
    out_dir = Path(out_dir)
    extra_files = extra_files or {}
    _prepare_out_dir(out_dir, force, tuple(extra_files))
    for name, path in extra_files.items():
        shutil.copyfile(path, out_dir / name)
    model = _bare_copy(model).eval().cpu()
    example_inputs = _as_tuple(example_inputs)
    example = tuple(_at_least_two(x) for x in example_inputs)
    check = _as_tuple(check_inputs) if check_inputs is not None else example_inputs
    with torch.no_grad():
        probe = model(*example)
    named = tuple(probe) if isinstance(probe, dict) else None
    signature = signature or Signature.batched(len(example), named)
    job = ExportJob(model, example, out_dir, signature, config or {})

    reference = run_in_chunks(lambda *xs: _eager(model, *xs), check)
    small = signature.shrink(check)
    small_reference = _eager(model, *small)

    outputs, single = {}, {}
    for name in formats:
        _write(FORMATS[name], job)
        run = FORMATS[name].load(job)
        outputs[name] = run_in_chunks(run, check)
        single[name] = run(*small)

    allowed = tolerance.allowed(reference)
    parity = {}
    for fmt, out in outputs.items():
        diff = max(_max_abs_diff(out, reference), _max_abs_diff(single[fmt], small_reference))
        parity[fmt] = {
            "max_abs_diff": diff,
            "allowed": allowed,
            "passed": diff <= allowed,
            "runtime": FORMATS[fmt].runtime,
        }

    int8_report = None
    if int8:
        tools.quantize(out_dir / ONNX, out_dir / ONNX_INT8)
        int8_session = tools.session(out_dir / ONNX_INT8)
        names, fetch = list(signature.names), signature.fetch
        quantised = run_in_chunks(lambda *xs: run_onnx(int8_session, names, xs, fetch), check)
        # several outputs pack into one tensor: no single task metric describes them
        one = isinstance(fetch, str)
        int8_report = _int8_report(
            reference, quantised, targets if one else None, task if one else ""
        )

    manifest = {
        "format_version": 1,
        "source": source or {},
        "model": {
            "class": job.class_name,
            "parameters": count_parameters(model),
            **(model_info or {}),
        },
        "inputs": [
            {
                "name": n,
                "shape": _axes(x, dynamic),
                "dtype": str(x.dtype).removeprefix("torch."),
            }
            for n, x, dynamic in zip(signature.names, example, signature.dynamic, strict=True)
        ],
        "outputs": [
            {"name": name, "shape": _axes(out, signature.output_axes)}
            for name, out in zip(
                signature.outputs,
                [probe[n] for n in signature.outputs] if named else [reference],
                strict=True,
            )
        ],
        "parity": {
            "checked_samples": int(check[0].shape[0]),
            "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol, "allowed": allowed},
            "formats": parity,
            "note": "max |export - eager PyTorch| over the check inputs and over the first sample "
            "alone (batch 1, other dynamic dims halved); allowed = atol + rtol * max|eager output|",
        },
        "int8": int8_report,
        "files": _describe_files(out_dir, (*EXPORT_FILES, *extra_files)),
        "versions": tools.versions(out_dir / ONNX if "onnx" in formats else None),
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


def _write(row: Format, job: ExportJob) -> None:
    """row.write(job), its failure one line: torch.export and the ONNX exporter raise many error
    types, with pages of trace, for a model they cannot trace."""
    try:
        row.write(job)
    except StillroomError:
        raise
    except Exception as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = lines[0][:300] if lines else "(no message)"
        raise StillroomError(
            f"{row.label} export of {type(job.model).__name__} failed ({type(err).__name__}: "
            f"{detail}); export the other formats with --format, or simplify the model's forward"
        ) from None


def _prepare_out_dir(out_dir: Path, force: bool, extra_files: tuple[str, ...] = ()) -> None:
    """Never overwrite without --force; even then, only a folder that holds nothing but an export
    (its own files, and the `extra_files` an export of this kind copies in)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise StillroomError(f"{out_dir} is a file; choose a folder for the export with --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise StillroomError(
                f"export folder {out_dir} already exists; pass --force to replace it or choose "
                "another --out"
            )
        ours = (*EXPORT_FILES, *extra_files)
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
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
def _eager(model: Callable[..., Any], *inputs: torch.Tensor) -> torch.Tensor:
    """The model's output as one float tensor: several outputs (a dict, or the tuple an export of
    one returns) packed as `pack_outputs` does, so one parity check covers them all."""
    out = model(*inputs)
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, tuple | list) and all(isinstance(x, torch.Tensor) for x in out):
        return pack_outputs(out)
    if not isinstance(out, torch.Tensor):
        raise StillroomError(
            f"export needs a model that returns a tensor or a dict of tensors, got "
            f"{type(out).__name__}; wrap it in a module whose forward returns what to deploy"
        )
    return out.float()


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
    elif task == "tokens":  # (N, L, V) logits: the next token each position predicts
        agreement = (quantised.argmax(-1) == reference.argmax(-1)).float().mean().item()
        report["top1_agreement_with_fp32"] = agreement
    if targets is not None:
        metric = "accuracy" if task == "classification" else "rmse"
        report["metric"] = metric
        report["fp32"] = task_metric(reference, targets, task)
        report["int8"] = task_metric(quantised, targets, task)
    return report


def _axes(x: torch.Tensor, dynamic: dict[int, str]) -> list[int | str]:
    """x's shape with each dynamic dim named: e.g. ["batch", "sequence", 100]."""
    return [dynamic.get(dim, size) for dim, size in enumerate(x.shape)]


def _describe_files(out_dir: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "bytes": (out_dir / name).stat().st_size,
            "sha256": hashlib.sha256((out_dir / name).read_bytes()).hexdigest(),
        }
        for name in names
        if (out_dir / name).is_file() and name != MANIFEST
    }
