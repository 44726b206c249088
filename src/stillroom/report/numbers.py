"""The report's numbers: quality of outputs (metric, agreement, calibration, per class) and the
costs of running a model on this machine (latency percentiles, throughput, peak memory).

Quality functions are pure over tensors; cost functions time or profile a callable.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stillroom.export.run_folder import task_metric
from stillroom.losses import IGNORE_INDEX

ECE_BINS = 15


@dataclass(frozen=True)
class Timing:
    """How latency is measured: `warmup` untimed calls, then `repeats` timed ones, at batch 1 and
    at `large_batch` (there `warmup // 4`, at least 2, and `large_repeats`: each call is longer and
    its spread smaller), with
    `threads` intra-op threads (None: torch's default, one per core). One thread is the stable
    choice on a busy machine: a multi-threaded op waits for its slowest thread, so another
    process holding a core stalls every call."""

    warmup: int = 20
    repeats: int = 200
    large_batch: int = 256
    large_repeats: int = 30
    threads: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


TIMING = Timing()
"""The report's default timing."""


# ---------------------------------------------------------------------------------------------
# quality


def reliability(
    logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS
) -> dict[str, Any]:
    """Expected calibration error (Guo et al. 2017) of (N, C) logits against (N,) class ids.

    Samples go to `bins` equal-width bins of confidence (the top softmax probability), bin b
    holding confidences in (b/bins, (b+1)/bins]; ECE = sum_b |B_b| / N * |accuracy_b - confidence_b|.
    Returns {"ece", "bins": [{"lower", "upper", "count", "accuracy", "confidence"}]} (accuracy and
    confidence are None for an empty bin).
    """
    keep = targets != IGNORE_INDEX
    probs = logits[keep].float().softmax(1)
    confidence, predicted = probs.max(1)
    correct = (predicted == targets[keep]).float()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    rows, ece, n = [], 0.0, len(confidence)
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        row: dict[str, Any] = {"lower": b / bins, "upper": (b + 1) / bins, "count": count}
        row["accuracy"] = correct[members].mean().item() if count else None
        row["confidence"] = confidence[members].mean().item() if count else None
        if count:
            ece += count / n * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"ece": ece, "bins": rows}


def per_class_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """Accuracy among the test samples of each class (None for a class absent from the split)."""
    predicted = logits.argmax(1)
    result: list[float | None] = []
    for cls in range(logits.shape[1]):
        members = targets == cls
        result.append((predicted[members] == cls).float().mean().item() if members.any() else None)
    return result


def agreement(outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> float:
    """Share of samples where the top-1 class of (N, C) `outputs` equals the teacher's."""
    return (outputs.argmax(1) == teacher_outputs.argmax(1)).float().mean().item()


def quality(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    teacher_outputs: torch.Tensor | None,
) -> dict[str, Any]:
    """The task metric, and for classification the agreement with the teacher (when given), ECE
    with its reliability bins and per-class accuracy."""
    if task == "regression":
        return {"rmse": task_metric(outputs, targets, task)}
    calibration = reliability(outputs, targets)
    row: dict[str, Any] = {
        "accuracy": task_metric(outputs, targets, task),
        "ece": calibration["ece"],
        "reliability": calibration["bins"],
        "per_class_accuracy": per_class_accuracy(outputs, targets),
    }
    if teacher_outputs is not None:
        row["teacher_agreement"] = agreement(outputs, teacher_outputs)
    return row


def retention(value: float, teacher: float, higher_is_better: bool) -> float:
    """How much of the teacher's quality a model keeps: student / teacher for a metric where higher
    is better (accuracy), teacher / student where lower is (rmse); 1.0 matches the teacher."""
    return value / teacher if higher_is_better else teacher / value


# ---------------------------------------------------------------------------------------------
# costs


def latency(run: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Wall-clock milliseconds of `run()`: p50, p95 and mean over `repeats` calls after `warmup`
    untimed ones (first calls pay for allocator growth and kernel selection)."""
    for _ in range(warmup):
        run()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        run()
        times[i] = time.perf_counter() - start
    times *= 1000.0
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": float(times.mean()),
    }


def batch_of(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """`size` real samples from (N, ...) `inputs`, cycling when N < size."""
    return inputs[torch.arange(size) % inputs.shape[0]]


def timed(run_batch: Callable[[torch.Tensor], Any], inputs: torch.Tensor, timing: Timing) -> dict:
    """Latency at batch 1 and at timing.large_batch, and the throughput each gives (samples/s)."""
    one, large = batch_of(inputs, 1), batch_of(inputs, timing.large_batch)
    at_one = latency(lambda: run_batch(one), timing.warmup, timing.repeats)
    at_large = latency(lambda: run_batch(large), max(2, timing.warmup // 4), timing.large_repeats)
    return {
        "latency_batch_1": at_one,
        f"latency_batch_{timing.large_batch}": at_large,
        "throughput_batch_1_per_s": 1000.0 / at_one["p50_ms"],
        f"throughput_batch_{timing.large_batch}_per_s": timing.large_batch
        * 1000.0
        / at_large["p50_ms"],
    }


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (BatchNorm statistics included) in memory."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def forward_peak_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Peak bytes torch's CPU allocator holds during one forward pass beyond what it held before:
    activations, outputs and kernel workspaces (the weights were allocated before, so they are not
    in it). Read from the profiler's allocation/free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(inputs)  # one untimed call: lazy first-call allocations are not a steady forward
        with (
            _native_stderr_silenced(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            model(inputs)
    # the raw event stream: prof.events() folds allocations into their ops and loses the order
    # that the running total (and so the peak) depends on
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def torch_costs(model: nn.Module, inputs: torch.Tensor, timing: Timing) -> dict[str, Any]:
    """Latency, throughput and memory of `model` on real (N, ...) inputs, eval + inference mode."""
    model = model.eval()

    def run(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(x)

    weights = weight_bytes(model)
    peaks = {
        size: forward_peak_bytes(model, batch_of(inputs, size)) for size in (1, timing.large_batch)
    }
    return {
        **timed(run, inputs, timing),
        "weight_bytes": weights,
        "forward_peak_bytes_batch_1": peaks[1],
        f"forward_peak_bytes_batch_{timing.large_batch}": peaks[timing.large_batch],
        # what serving one large batch needs: the weights plus the forward's peak on top of them
        "peak_memory_bytes": weights + peaks[timing.large_batch],
    }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (None: leave torch's setting), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> dict[str, Any]:
    """Where the costs were measured: they hold for this machine and these thread counts only."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines straight to file descriptor 2, which no
    logging setting reaches; point fd 2 at /dev/null for the profiled call only."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
