"""The report of any method's run, from its result contract (summary.json).

The classic run's report re-measures teacher and students on this machine (build.py). Other
methods' models are exits, generations, ensemble members or transformers folders, each measured
by the method itself once, on the run's test split; this report shows those numbers (it measures
nothing again, so a figure is never given twice), the settings, the notes and the learning curves
of every phase folder that logged metrics.jsonl.

Report folder: report.html, report.json, curves.png, models.png. A method's own figures
(RUN_DIR/figures/*.png) and texts (RUN_DIR/texts/*.md, e.g. an interpretable student's rules) are
embedded too.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.report.figures import DPI, curves
from stillroom.report.html import CSS, _e, _table
from stillroom.report.numbers import machine
from stillroom.results import Summary, table_cells


def phase_folders(run_dir: Path) -> tuple[str, ...]:
    """Every subfolder (one level down, and `exits/`-style two levels) with a metrics.jsonl."""
    found = {p.parent.relative_to(run_dir).as_posix() for p in run_dir.glob("*/metrics.jsonl")}
    found |= {p.parent.relative_to(run_dir).as_posix() for p in run_dir.glob("*/*/metrics.jsonl")}
    return tuple(sorted(found))


def summary_numbers(run_dir: Path, summary: Summary) -> dict[str, Any]:
    from stillroom.report.build import read_curves

    return {
        "name": run_dir.resolve().name,
        "method": summary.method,
        "run_dir": str(run_dir.resolve()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "task": summary.task,
        "metric": summary.metric,
        "higher_is_better": summary.higher_is_better,
        "summary": asdict(summary),
        "curves": read_curves(run_dir, phase_folders(run_dir)),
        "measurement": {
            "machine": machine(),
            "note": "every number comes from the run itself (summary.json): measured once, "
            "by the method, on the run's test split; latency on the machine that ran it",
        },
    }


def models_figure(summary: Summary) -> plt.Figure:
    """The headline metric, parameters and size on disk of every model, side by side."""
    names = [m.name for m in summary.models]
    panels = [
        (f"test {summary.metric}", [m.metrics.get(summary.metric) for m in summary.models]),
        ("parameters", [m.parameters for m in summary.models]),
        ("size on disk (bytes)", [m.size_bytes for m in summary.models]),
    ]
    panels = [(title, values) for title, values in panels if any(v is not None for v in values)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 0.45 * len(names) + 1.6))
    for ax, (title, values) in zip(list(getattr(axes, "flat", [axes])), panels, strict=True):
        shown = [0.0 if v is None else float(v) for v in values]
        colors = [f"C{i % 10}" for i in range(len(names))]
        ax.barh(names, shown, color=colors)
        ax.invert_yaxis()
        ax.set(title=title)
        if title != f"test {summary.metric}" and max(shown) > 50 * max(min(shown), 1):
            ax.set_xscale("log")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def write_summary_report(run_dir: Path, out: Path, summary: Summary) -> Path:
    numbers = summary_numbers(run_dir, summary)
    figures = {"models": out / "models.png", "curves": out / "curves.png"}
    for name, draw in (
        ("models", lambda: models_figure(summary)),
        ("curves", lambda: curves(numbers)),
    ):
        fig = draw()
        fig.savefig(figures[name], dpi=DPI)
        plt.close(fig)
    for own in sorted((run_dir / "figures").glob("*.png")):  # a method's own (tune: the study's)
        figures[own.stem] = own
    numbers["figures"] = {name: path.name for name, path in figures.items()}
    texts = {own.stem: own.read_text() for own in sorted((run_dir / "texts").glob("*.md"))}
    numbers["texts"] = sorted(texts)
    atomic_write_json(out / "report.json", numbers)
    html = render_summary_html(numbers, summary, figures, texts)
    atomic_write_text(out / "report.html", html)
    return out / "report.html"


def render_summary_html(
    numbers: dict[str, Any],
    summary: Summary,
    figures: dict[str, Path],
    texts: dict[str, str] | None = None,
) -> str:
    headers, body = table_cells(summary)
    m = numbers["measurement"]["machine"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>stillroom report: {_e(numbers['name'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_e(summary.title)}</h1>",
        f'<p class="meta">method {_e(summary.method)} &middot; run folder '
        f"{_e(numbers['run_dir'])} &middot; report written {_e(numbers['created'])} on "
        f"{_e(m['processor'])}, {m['cpu_count']} CPUs</p>",
        "<h2>Models</h2>",
        _table(headers, [(cells[0], cells) for cells in body]),
        *(f'<p class="meta">{_e(note)}</p>' for note in summary.notes),
        f'<p class="meta">{_e(numbers["measurement"]["note"])}</p>',
    ]
    if summary.settings:
        parts.append("<h2>Settings</h2><dl>")
        parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in summary.settings.items()]
        parts.append("</dl>")
    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="fig-{name}"><img src="data:image/png;base64,{data}" alt="{name}">'
        )
        parts.append("</figure>")
    for name, text in (texts or {}).items():  # a method's own text (the rules of a tree, ...)
        parts.append(f'<h2 id="text-{_e(name)}">{_e(name)}</h2><pre>{_e(text)}</pre>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_index(
    folder: Path, title: str, summaries: dict[str, Summary], reports: dict[str, Path]
) -> Path:
    """index.html in `folder`: each run's table and a link to its report (the demo's two)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    for name, summary in summaries.items():
        headers, body = table_cells(summary)
        parts.append(f"<h2>{_e(summary.title)}</h2>")
        parts.append(_table(headers, [(cells[0], cells) for cells in body]))
        parts += [f'<p class="meta">{_e(note)}</p>' for note in summary.notes]
        if name in reports:
            link = Path(reports[name]).resolve().relative_to(Path(folder).resolve()).as_posix()
            parts.append(f'<p><a href="{_e(link)}">the full report: {_e(link)}</a></p>')
    parts.append("</body></html>")
    atomic_write_text(Path(folder) / "index.html", "\n".join(parts) + "\n")
    return Path(folder) / "index.html"
