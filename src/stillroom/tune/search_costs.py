"""What a searched candidate costs on this machine: parameters, the size of its exported ONNX
file, and its latency in PyTorch and in ONNX Runtime at batch 1 and at a stated larger batch
(median of timed calls, after untimed warm-up ones), both with a fixed number of threads.

The ONNX file is written by the export code every `stillroom export` uses (parity checked
against eager PyTorch), so a size_kb or latency_ms budget bounds the file a user would deploy.
Without ONNX (search.onnx: false, e.g. where the export extra is not installed) the size is that
of the safetensors weights and PyTorch alone is timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.models import count_parameters

WARMUP = 10

RUNTIMES = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
"""What a candidate is timed in (the `{name}_ms` keys measure_candidate returns), as shown."""


def measure_candidate(
    model: nn.Module,
    folder: Path,
    sample: torch.Tensor,
    *,
    batch: int,
    repeats: int,
    threads: int,
    runtime: str,
    onnx: bool = True,
) -> dict[str, Any]:
    """Export `model` to FOLDER/model.onnx and time it. `sample`: (N, ...) real inputs (the
    validation split's first rows), used for the parity check and as the timed batches.
    Returns parameters, size_bytes, size_kb, pytorch_ms / onnxruntime_ms at batch 1 and at
    `batch`, and latency_ms: `runtime`'s batch-1 figure (what a latency_ms budget bounds).
    onnx=False: no export; the size is that of FOLDER/model.safetensors, PyTorch is timed alone."""
    from stillroom.report.numbers import batch_of, latency, torch_threads

    model = model.eval().cpu()
    one, large = batch_of(sample, 1), batch_of(sample, batch)
    few = max(5, repeats // 10)  # a large batch takes longer per call and spreads less
    runs = {"pytorch": _eager(model)}
    if onnx:
        from stillroom.export.formats import ONNX, export_model

        export_model(model, sample[:8], folder, check_inputs=sample, formats=("onnx",), force=True)
        file = folder / ONNX
        runs["onnxruntime"] = _onnx_runtime(file, threads)
    else:
        from stillroom.models import save_weights

        folder.mkdir(parents=True, exist_ok=True)
        file = folder / "model.safetensors"
        save_weights(model, file)
    times = {}
    with torch_threads(threads):
        for name, run in runs.items():
            times[f"{name}_ms"] = latency(lambda r=run: r(one), WARMUP, repeats)["p50_ms"]
            times[f"{name}_ms_batch_{batch}"] = latency(lambda r=run: r(large), 3, few)["p50_ms"]
    size = file.stat().st_size
    return {
        "parameters": count_parameters(model),
        "file": file.name,
        "size_bytes": size,
        "size_kb": size / 1024,
        "latency_ms": times[f"{runtime}_ms"],
        "batch": batch,
        "threads": threads,
        **times,
    }


def _eager(model: nn.Module) -> Any:
    def run(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(x)

    return run


def _onnx_runtime(file: Path, threads: int) -> Any:
    from stillroom.export.runtime import onnx_tools, run_onnx

    session = onnx_tools().session(file, threads=threads)
    return lambda x: run_onnx(session, ["input"], (x,), "output")


def pareto_front(rows: list[dict[str, Any]], cost: str, maximize: bool) -> list[dict[str, Any]]:
    """The rows no other row beats on both `value` and `costs[cost]`, cheapest first: each one
    is better than every cheaper one (rows: {"value", "costs": {cost: ...}, ...})."""
    ordered = sorted(
        rows, key=lambda r: (r["costs"][cost], -r["value"] if maximize else r["value"])
    )
    front: list[dict[str, Any]] = []
    for row in ordered:
        if not front or (
            row["value"] > front[-1]["value"] if maximize else row["value"] < front[-1]["value"]
        ):
            front.append(row)
    return front
