"""What a model costs: parameters, bytes on disk, CPU latency (median over repetitions)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from stillroom.models import count_parameters


@torch.inference_mode()
def latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    warmup: int = 20,
    repeats: int = 200,
) -> float:
    """Median wall-clock milliseconds of one forward pass on the CPU (eval mode, inference mode)."""
    model = model.eval().cpu()
    x = torch.randn(batch_size, *input_shape)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def model_costs(
    model: nn.Module, weights_file: Path, input_shape: tuple[int, ...]
) -> dict[str, float]:
    return {
        "parameters": count_parameters(model),
        "size_bytes": Path(weights_file).stat().st_size,
        "latency_ms": latency_ms(model, input_shape),
    }


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def weights_bytes(folder: Path) -> int | None:
    """Bytes of the weight files (*.safetensors) in a saved model folder; None without any."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
