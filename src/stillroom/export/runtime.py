"""The runtimes an export is checked with: onnx + onnxruntime (imported only when exporting:
they are the optional `export` extra), chunked runs over many inputs, and the exporters' chatter
silenced."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stillroom.errors import StillroomError

CHUNK = 1024
"""Check inputs run through each runtime in chunks of this many samples, to bound memory."""


def run_onnx(
    session: Any,
    names: list[str],
    inputs: tuple[torch.Tensor, ...],
    output: str | list[str] = "output",
) -> torch.Tensor:
    """The `output` of an onnxruntime session fed `inputs` under `names`, as a float32 tensor
    (several outputs named in a list: packed into one, as `pack_outputs`)."""
    feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
    outputs = [output] if isinstance(output, str) else output
    results = [torch.from_numpy(np.asarray(r)) for r in session.run(outputs, feeds)]
    return results[0].float() if isinstance(output, str) else pack_outputs(results)


def pack_outputs(outputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Several (N, ...) outputs as one (N, total) float tensor, each flattened after dim 0 and
    laid side by side in order: one tensor to check an export's parity on."""
    return torch.cat([x.float().reshape(len(x), -1) for x in outputs], dim=1)


def run_in_chunks(
    run: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """run(*inputs) over (N, ...) inputs in chunks of CHUNK samples -> (N, ...) outputs."""
    n = inputs[0].shape[0]
    return torch.cat([run(*(x[i : i + CHUNK] for x in inputs)) for i in range(0, n, CHUNK)])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' chatter that says nothing about this model: "torchvision is not
    installed" log lines and torch's own internal deprecation notices. Errors still raise, and
    other warnings still show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            # inputs sharing a Dim: it names the axis once, which is what was asked
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
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

    def versions(self, onnx_path: Path | None) -> dict[str, Any]:
        """The libraries' versions, and the opset of `onnx_path` (None: no ONNX file written)."""
        opset = None
        if onnx_path is not None:
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
