"""`build_report`: measure every model of a run folder on this machine, draw the figures, and write
report.json, the PNGs and one self-contained report.html.

Report folder (default RUN_DIR/report/):
    report.html     the report: tables and every figure embedded as base64 PNG, no external links
    report.json     every number in the report (models, exports, curves, machine, timing settings)
    tradeoff.png    task metric against CPU latency, every model of the run (and its exports)
    costs.png       parameters, size on disk, peak memory and latency side by side
    curves.png      every train/* and val/* series of every phase's metrics.jsonl
    reliability.png classification: confidence against accuracy, with ECE (15 bins)
    per_class.png   classification: test accuracy per class
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stillroom.errors import StillroomError
from stillroom.export.formats import MANIFEST, ONNX, ONNX_INT8, WEIGHTS
from stillroom.export.run_folder import RunFolder, open_run, read_json_file, read_text_file
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.models import count_parameters
from stillroom.report.figures import write_figures
from stillroom.report.html import render_html
from stillroom.report.numbers import (
    ECE_BINS,
    TIMING,
    Timing,
    agreement,
    machine,
    quality,
    reliability,
    retention,
    timed,
    torch_costs,
    torch_threads,
)
from stillroom.report.summary_report import write_summary_report
from stillroom.results import SUMMARY, Summary, read_summary, write_summary
from stillroom.runs import gap_closed, read_marker, write_marker
from stillroom.train.evaluate import METRICS

NOTES = {
    "latency": "wall-clock time of one forward pass on the CPU (eval mode, torch.inference_mode), "
    "on real test inputs, after untimed warm-up calls; p50/p95 over the timed repetitions. "
    "Throughput = batch size / p50. Speed-up = teacher p50 / model p50 at the same batch size.",
    "peak_memory": "weights (every parameter and buffer) + the peak bytes torch's CPU allocator "
    "holds during one forward pass of the large batch beyond what it held before (activations, "
    "outputs, kernel workspaces), read from the torch profiler's allocation events. Process "
    "overhead (the Python interpreter, torch itself) is not included. Not measured for onnxruntime.",
    "size_on_disk": "bytes of the model's file: model.safetensors for PyTorch models, the .onnx "
    "file for exports",
    "ece": f"expected calibration error over {ECE_BINS} equal-width bins of top-1 softmax "
    "confidence: sum over bins of (bin share) * |accuracy - mean confidence|",
    "retention": "student / teacher for accuracy; teacher / student for rmse (lower is better); "
    "1.0 matches the teacher",
    "gap_closed": "(kd - scratch) / (teacher - scratch) on the test metric",
}


def build_report(run_dir: Path, out_dir: Path | None = None, timing: Timing = TIMING) -> Path:
    """Write the report of `run_dir` into `out_dir` (default RUN_DIR/report) and return the path
    of report.html. Files of an earlier report there are replaced. A classic run is measured
    again on this machine; any other method's run is reported from its summary.json."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if (run_dir / SUMMARY).is_file() else None
    if summary is not None and summary.method != "classic":
        out = _report_folder(run_dir, out_dir)
        return write_summary_report(run_dir, out, summary)
    run = open_run(run_dir, required=("teacher", "student_kd"))
    out = _report_folder(run.path, out_dir)
    with torch_threads(timing.threads):
        numbers = measure_run(run, timing)
    if summary is not None:
        numbers["settings"], numbers["notes"] = summary.settings, summary.notes
    figures = write_figures(numbers, out)
    numbers["figures"] = {name: path.name for name, path in figures.items()}
    atomic_write_json(out / "report.json", numbers)
    atomic_write_text(out / "report.html", render_html(numbers, figures))
    if summary is not None:
        _one_latency(run.path, summary, numbers, timing)
    return out / "report.html"


def _one_latency(run_dir: Path, summary: Summary, numbers: dict[str, Any], timing: Timing) -> None:
    """The run measured a latency when it finished; the report has just measured it again, more
    carefully. One figure per model: results.md and summary.json take the report's batch-1 p50,
    so that the table and the report never disagree."""
    for row in summary.models:
        measured = numbers["models"].get(row.name)
        if measured is not None:
            row.latency_ms = measured["latency_batch_1"]["p50_ms"]
    line = (
        f"latency: the report's batch-1 p50 over {timing.repeats} calls on test inputs "
        f"({numbers['created']}; p95 and batch {timing.large_batch} in report/report.json)"
    )
    summary.notes = [n for n in summary.notes if not n.startswith("latency: the report's")]
    write_summary(replace(summary, notes=[*summary.notes, line]), run_dir)
    results = run_dir / "results.json"
    if results.is_file():  # every number of the run, the same latency included
        payload = read_json_file(results)
        for row in summary.models:
            if row.name in payload.get("models", {}):
                payload["models"][row.name]["latency_ms"] = row.latency_ms
        payload["latency_source"] = line
        atomic_write_json(results, payload)


def _report_folder(run_dir: Path, out_dir: Path | None) -> Path:
    """The report folder, marked as ours before anything is drawn into it."""
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise StillroomError(f"{out} is a file; choose a folder for the report with --out")
    earlier = (out / "report.json").is_file() or (read_marker(out) or {}).get("kind") == "report"
    if out.is_dir() and any(out.iterdir()) and not earlier:
        # only an earlier report (finished or interrupted) is replaced: --out pointing at a run
        # folder must not clobber it
        raise StillroomError(
            f"{out} holds files that are not a stillroom report; choose an empty --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "report")  # first: a report killed after its first figure is still ours
    return out


def measure_run(run: RunFolder, timing: Timing) -> dict[str, Any]:
    """Every number of the report, JSON-able."""
    task, metric = run.task, run.metric
    higher_is_better = METRICS[task][1] == "max"
    test = run.test
    models = {role: run.load(role)[0] for role in run.roles}
    outputs = {role: _predict(model, test.inputs) for role, model in models.items()}
    teacher_outputs = outputs["teacher"] if task == "classification" else None
    large = f"batch_{timing.large_batch}"

    rows: dict[str, dict[str, Any]] = {}
    for role, model in models.items():
        rows[role] = {
            **quality(outputs[role], test.targets, task, _unless_teacher(role, teacher_outputs)),
            "parameters": count_parameters(model),
            "size_bytes": (run.path / role / WEIGHTS).stat().st_size,
            **torch_costs(model, test.inputs, timing),
        }
    exports, exports_note = measure_exports(run, teacher_outputs, timing)
    teacher = rows["teacher"]
    for row in [*rows.values(), *exports.values()]:
        row["retention"] = (
            retention(row[metric], teacher[metric], higher_is_better) if teacher[metric] else None
        )
        row["speedup_vs_teacher"] = {
            key: teacher[f"latency_{key}"]["p50_ms"] / row[f"latency_{key}"]["p50_ms"]
            for key in ("batch_1", large)
        }
        row["compression_vs_teacher"] = teacher["parameters"] / row["parameters"]
    return {
        "name": run.recipe.name,
        "run_dir": str(run.path.resolve()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "task": task,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "test_samples": len(test),
        "num_outputs": test.num_outputs,
        "gap_closed": gap_closed(rows, metric) if "student_scratch" in rows else None,
        "models": rows,
        "exports": exports,
        "exports_note": exports_note,
        "curves": read_curves(run.path, run.roles),
        "measurement": {"machine": machine(), "timing": timing.as_dict(), "notes": NOTES},
    }


def measure_exports(
    run: RunFolder, teacher_outputs: torch.Tensor | None, timing: Timing
) -> tuple[dict[str, dict[str, Any]], str]:
    """The ONNX files of RUN_DIR/export (when `stillroom export` wrote them from this run's current
    student), measured through onnxruntime like the PyTorch models; and a line saying which."""
    folder = run.path / "export"
    if not (folder / MANIFEST).is_file():
        return {}, f"no export in {folder}: run `stillroom export {run.path} --int8` to add one"
    manifest = read_json_file(folder / MANIFEST, "export")
    if not _export_manifest_fits(manifest):
        return (
            {},
            f"the export manifest {folder / MANIFEST} is damaged; rerun `stillroom export --force`",
        )
    source = manifest.get("source", {})
    student = run.path / source.get("role", "student_kd") / WEIGHTS
    exported = manifest["files"].get(WEIGHTS, {}).get("sha256")
    if not student.is_file() or exported != hashlib.sha256(student.read_bytes()).hexdigest():
        # the run was redone since the export: the exported numbers would describe another model
        return (
            {},
            f"the export in {folder} is of an earlier student; rerun `stillroom export --force`",
        )
    from stillroom.export.formats import onnx_tools, run_in_chunks, run_onnx

    tools = onnx_tools()
    names = [spec["name"] for spec in manifest["inputs"]]
    test = run.test
    result = {}
    for label, name in (("onnx_fp32", ONNX), ("onnx_int8", ONNX_INT8)):
        if not (folder / name).is_file():
            continue
        session = tools.session(folder / name, threads=timing.threads)
        outputs = run_in_chunks(lambda x, s=session: run_onnx(s, names, (x,)), (test.inputs,))
        row: dict[str, Any] = {
            "file": str(folder / name),
            run.metric: quality(outputs, test.targets, run.task, None)[run.metric],
            "parameters": manifest["model"]["parameters"],
            "size_bytes": (folder / name).stat().st_size,
            **timed(lambda x, s=session: run_onnx(s, names, (x,)), test.inputs, timing),
        }
        if teacher_outputs is not None:
            row["teacher_agreement"] = agreement(outputs, teacher_outputs)
            row["ece"] = reliability(outputs, test.targets)["ece"]
        result[label] = row
    return result, f"exports measured through onnxruntime from {folder}"


def _export_manifest_fits(manifest: Any) -> bool:
    """The keys measure_exports reads, of the types it reads them as; the source role one of the
    run's own model folders (a crafted `../..` would hash a file outside the run)."""
    from stillroom.pipeline import ROLES

    try:
        source = manifest.get("source", {})
        role = source.get("role", "student_kd")
        return (
            role in ROLES
            and isinstance(manifest["files"], dict)
            and isinstance(manifest["files"].get(WEIGHTS, {}), dict)
            and all(isinstance(spec["name"], str) for spec in manifest["inputs"])
            and isinstance(manifest["model"]["parameters"], int)
        )
    except (AttributeError, KeyError, TypeError):
        return False


def read_curves(run_dir: Path, roles: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """{role: {"epoch": [...], "train/...": [...], "val/...": [...]}} from each role's
    metrics.jsonl; every train/* and val/* key present is kept, so loss terms added later appear
    without code changes (None where an epoch lacks a key). A teacher loaded from a checkpoint was
    not trained in this run and has no entry."""
    curves: dict[str, dict[str, list]] = {}
    for role in roles:
        path = Path(run_dir) / role / "metrics.jsonl"
        if not path.is_file():
            continue
        records = []
        for line in read_text_file(path, "run folder").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = None  # a line cut by a crash (or edited): the curves skip it
            if isinstance(record, dict):
                records.append(record)
        if not records:
            continue
        keys = sorted({k for r in records for k in r if k.startswith(("train/", "val/"))})
        series: dict[str, list] = {"epoch": [r.get("epoch") for r in records]}
        series.update({key: [r.get(key) for r in records] for key in keys})
        curves[role] = series
    return curves


@torch.no_grad()
def _predict(model: torch.nn.Module, inputs: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([model(inputs[i : i + chunk]).float() for i in range(0, len(inputs), chunk)])


def _unless_teacher(role: str, teacher_outputs: torch.Tensor | None) -> torch.Tensor | None:
    # the teacher agrees with itself by definition: no agreement column for it
    return None if role == "teacher" else teacher_outputs
