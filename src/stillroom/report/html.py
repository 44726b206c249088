"""report.html: one self-contained page (inline CSS, figures as base64 PNG; no scripts, no links
to anything outside the file), so it can be mailed, attached to an issue or opened offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from stillroom.measure import format_bytes
from stillroom.report.figures import LABELS
from stillroom.results import gap_note

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1150px; padding: 0 1rem; color: #1f2328; line-height: 1.45; background: #fff; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; }
.meta { color: #57606a; font-size: 0.9rem; }
.headline { background: #f0f6ff; border-left: 4px solid #0969da; padding: 0.8rem 1rem; font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d0d7de; padding: 0.35rem 0.6rem; text-align: right; }
th { background: #f6f8fa; }
td:first-child, th:first-child { text-align: left; }
tr.kd td { font-weight: 600; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9rem; margin-top: 0.3rem; }
dt { font-weight: 600; margin-top: 0.5rem; }
dd { margin-left: 1.2rem; color: #3d444d; }
"""

CAPTIONS = {
    "tradeoff": "Test {metric} against CPU latency for every model of the run (and its ONNX "
    "exports when present). Up-left is better for accuracy; down-left for rmse.",
    "costs": "What each model costs: parameters, size on disk, peak memory while serving the large "
    "batch, and latency at batch 1 (log scale when the spread is wide).",
    "curves": "Learning curves: every train/* and val/* series logged in each phase's "
    "metrics.jsonl, per epoch.",
    "reliability": "Reliability diagrams: accuracy within each of the 15 confidence bins against "
    "the diagonal of perfect calibration; red outlines span the gap to the bin's mean confidence (empty bins are left out).",
    "per_class": "Test accuracy within each class.",
}


def render_html(numbers: dict[str, Any], figures: dict[str, Path]) -> str:
    """The whole page as a string; every figure in `figures` is embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>stillroom report: {_e(numbers['name'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Compression report: {_e(numbers['name'])}</h1>",
        f'<p class="meta">run folder {_e(numbers["run_dir"])} &middot; {_e(numbers["task"])} &middot; '
        f"{numbers['test_samples']:,} test samples &middot; measured {_e(numbers['created'])} on "
        f"{_e(_machine_line(numbers))}</p>",
        f'<p class="headline">{_e(headline(numbers))}</p>',
        "<h2>Quality on the test split</h2>",
        _quality_table(numbers),
        "<h2>Costs on this machine</h2>",
        _costs_table(numbers),
        f'<p class="meta">{_e(numbers["exports_note"])}</p>',
        *_settings(numbers),
        "<h2>Figures</h2>",
    ]
    for name, path in figures.items():
        caption = CAPTIONS[name].format(metric=numbers["metric"])
        if name == "curves":
            caption += _missing_curves(numbers)
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="fig-{name}"><img src="data:image/png;base64,{data}" alt="{_e(name)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    parts.append("<h2>How these numbers were measured</h2><dl>")
    for key, note in numbers["measurement"]["notes"].items():
        parts.append(f"<dt>{_e(key.replace('_', ' '))}</dt><dd>{_e(note)}</dd>")
    timing = numbers["measurement"]["timing"]
    parts.append(
        f"<dt>timing</dt><dd>{timing['warmup']} warm-up calls; {timing['repeats']} timed calls at "
        f"batch 1 and {timing['large_repeats']} at batch {timing['large_batch']}; "
        f"{numbers['measurement']['machine']['torch_threads']} torch threads. Other processes "
        "running on the machine at the same time slow every model down, the p95 most.</dd></dl>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def headline(numbers: dict[str, Any]) -> str:
    """One sentence: what the distilled student keeps and what it saves against the teacher."""
    metric = numbers["metric"]
    teacher, kd = numbers["models"]["teacher"], numbers["models"]["student_kd"]
    large = numbers["measurement"]["timing"]["large_batch"]
    speed = kd["speedup_vs_teacher"]
    text = (
        f"The distilled student has {kd['compression_vs_teacher']:.1f}x fewer parameters "
        f"({kd['parameters']:,} vs {teacher['parameters']:,}), is "
        f"{teacher['size_bytes'] / kd['size_bytes']:.1f}x smaller on disk and runs "
        f"{speed['batch_1']:.1f}x faster at batch 1 ({speed[f'batch_{large}']:.1f}x at batch "
        f"{large}) on this CPU; test {metric} {kd[metric]:.4f} against the teacher's "
        f"{teacher[metric]:.4f}"
    )
    if kd["retention"] is not None:
        text += f" (retention {kd['retention']:.3f})"
    if numbers["gap_closed"] is not None:
        scratch = numbers["models"]["student_scratch"][metric]
        text += (
            f"; the same student trained on labels alone reaches {scratch:.4f}, so distillation "
            f"closes {numbers['gap_closed']:.2f} of the gap"
        )
    elif "student_scratch" in numbers["models"]:
        scratch = numbers["models"]["student_scratch"][metric]
        text += (
            f"; the same student trained on labels alone reaches {scratch:.4f}, as good as or "
            "better than the teacher, so there is no gap for distillation to close"
        )
    return text + "."


def _quality_table(numbers: dict[str, Any]) -> str:
    metric = numbers["metric"]
    classification = numbers["task"] == "classification"
    head = ["model", f"test {metric}", "retention"]
    if classification:
        head += ["top-1 agreement with teacher", "ECE (15 bins)"]
    rows = []
    for name, row in {**numbers["models"], **numbers["exports"]}.items():
        cells = [LABELS[name], f"{row[metric]:.4f}", _num(row["retention"], ".3f")]
        if classification:
            cells += [_num(row.get("teacher_agreement"), ".4f"), _num(row.get("ece"), ".4f")]
        rows.append((name, cells))
    models = numbers["models"]
    value = {name: models[name][metric] if name in models else None for name in LABELS}
    _, foot = gap_note(
        value["teacher"],
        value["student_scratch"],
        value["student_kd"],
        metric,
        numbers["higher_is_better"],
    )
    return _table(head, rows) + f'<p class="meta">{_e(foot)}</p>'


def _costs_table(numbers: dict[str, Any]) -> str:
    large = numbers["measurement"]["timing"]["large_batch"]
    head = [
        "model",
        "parameters",
        "size on disk",
        f"peak memory (batch {large})",
        "latency batch 1 p50 / p95",
        f"latency batch {large} p50 / p95",
        f"throughput batch {large}",
        f"speed-up vs teacher (1 / {large})",
    ]
    rows = []
    for name, row in {**numbers["models"], **numbers["exports"]}.items():
        one, big = row["latency_batch_1"], row[f"latency_batch_{large}"]
        speed = row["speedup_vs_teacher"]
        memory = row.get("peak_memory_bytes")
        cells = [
            LABELS[name],
            f"{row['parameters']:,}",
            format_bytes(row["size_bytes"]),
            "n/a" if memory is None else format_bytes(memory),
            _latency(one, 3),
            _latency(big, 2),
            f"{row[f'throughput_batch_{large}_per_s']:,.0f} /s",
            f"{speed['batch_1']:.1f}x / {speed[f'batch_{large}']:.1f}x",
        ]
        rows.append((name, cells))
    return _table(head, rows)


def _settings(numbers: dict[str, Any]) -> list[str]:
    """What produced these models (the run's summary.json): data, T, alpha, epochs, architectures."""
    settings = numbers.get("settings") or {}
    if not settings:
        return []
    items = [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in settings.items()]
    return ["<h2>Settings</h2><dl>", *items, "</dl>"]


def _latency(row: dict[str, Any], ndigits: int) -> str:
    """p50 / p95, flagged when the p95 is over 3x the p50: the machine was busy while timing."""
    p50, p95 = row["p50_ms"], row["p95_ms"]
    flag = " (noisy: p95 > 3x p50)" if p95 > 3 * p50 else ""
    return f"{p50:.{ndigits}f} / {p95:.{ndigits}f} ms{flag}"


def _table(head: list[str], rows: list[tuple[str, list[str]]]) -> str:
    lines = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for name, cells in rows:
        css = ' class="kd"' if name == "student_kd" else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def _missing_curves(numbers: dict[str, Any]) -> str:
    missing = [LABELS[r] for r in numbers["models"] if r not in numbers["curves"]]
    if not missing:
        return ""
    return (
        f" No curves for: {', '.join(missing)} (not trained in this run, e.g. a teacher loaded "
        "from a checkpoint)."
    )


def _machine_line(numbers: dict[str, Any]) -> str:
    m = numbers["measurement"]["machine"]
    return (
        f"{m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, Python {m['python']}"
    )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
