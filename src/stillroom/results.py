"""The one result contract every method returns, its file, and its two renderers.

A method's run ends with a `Summary`: the models it produced, each with its role and test
metrics, the settings that produced them and the lines worth saying under the table (gap closed,
what the teacher is). It is written to RUN_DIR/summary.json and rendered once for the terminal
(`terminal_table`) and once as markdown (`markdown_table`, RUN_DIR/results.md). `stillroom report`
and `stillroom export` read summary.json, so they understand the run folder of every method.

    summary.json = {"method", "title", "task", "metric", "higher_is_better", "primary",
                    "models": [ModelResult...], "settings", "notes"}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich import box
from rich.table import Table

from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.measure import format_bytes

SUMMARY = "summary.json"
Role = Literal[
    "teacher", "baseline", "distilled", "exit", "generation", "member", "ensemble", "client", "task"
]
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]


@dataclass
class ModelResult:
    """One model a run produced (or was given), measured on the run's test split."""

    name: str
    """Row label, unique in the run: teacher, student_kd, gen-1, exit_2/self_distilled, ..."""
    role: Role
    metrics: dict[str, float | None]
    """Test metrics, the headline metric first (e.g. accuracy, teacher_agreement)."""
    folder: str | None = None
    """The model folder relative to the run folder (model.json or a transformers config.json);
    None for a model that is not saved on its own (an ensemble's mean, a frozen teacher file)."""
    parameters: int | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    """CPU, batch 1, median of timed repetitions (measured once, by the method)."""
    architecture: str = ""
    teacher: str = ""
    """The name of the model it learned from ("" for none)."""


@dataclass
class Summary:
    method: str
    title: str
    task: str
    metric: str
    """The headline metric: a key of every model's `metrics` (None where it does not apply)."""
    higher_is_better: bool
    models: list[ModelResult]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    primary: str | None = None
    """The student `stillroom export RUN_DIR` exports (a name in `models`)."""

    def model(self, name: str) -> ModelResult:
        for row in self.models:
            if row.name == name:
                return row
        raise StillroomError(
            f"the run has no model {name!r}; it has: {', '.join(m.name for m in self.models)}"
        )

    def columns(self) -> list[str]:
        """The metric columns: the headline first, then every other key in first-seen order."""
        names = [self.metric]
        for row in self.models:
            names += [k for k in row.metrics if k not in names]
        return names


def write_summary(summary: Summary, run_dir: Path) -> None:
    """summary.json and results.md of `run_dir`."""
    payload = asdict(summary)
    atomic_write_json(Path(run_dir) / SUMMARY, payload)
    atomic_write_text(Path(run_dir) / "results.md", markdown_table(summary) + "\n")


def read_summary(run_dir: Path) -> Summary:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise StillroomError(
            f"{run_dir} holds no {SUMMARY}: the run has not finished (or was made by a stillroom "
            f"older than the result contract); rerun it with `stillroom distill ... --out {run_dir} "
            "--resume`"
        )
    try:  # a received or edited folder: any damage is one line naming the file
        payload = json.loads(path.read_bytes().decode("utf-8"))
        models = [ModelResult(**row) for row in payload.pop("models")]
        return Summary(**payload, models=models)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise StillroomError(
            f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}); rerun the run with "
            f"`stillroom distill ... --out {run_dir} --resume`, or start it again"
        ) from None


def describe(spec: dict[str, Any]) -> str:
    """A short architecture label for the tables: 'mlp 64', 'mlp 128-64', 'cnn 32-64/128'
    (channels/hidden), 'resnet 16-32-64/1-1-1' (widths/blocks), 'factory my_models:build',
    'onnx teacher.onnx' (a model read from a file: the file's name)."""

    def dashed(values: Any) -> str:
        return "-".join(map(str, values)) if isinstance(values, list) else str(values)

    kind = spec["kind"]
    if kind == "resnet":
        return f"resnet {dashed(spec['widths'])}/{dashed(spec['blocks'])}"
    if kind == "cnn":
        return f"cnn {dashed(spec['channels'])}/{dashed(spec['hidden'])}"
    if kind == "factory":
        return f"factory {spec['factory']}"
    if "hidden" in spec:
        return f"{kind} {dashed(spec['hidden']) or 'linear'}"
    if spec.get("path"):
        return f"{kind} {Path(spec['path']).name}"
    return str(kind)


# --- what is said under the table ----------------------------------------------------------------


def gap_note(
    teacher: float | None, scratch: float | None, kd: float | None, metric: str, higher: bool
) -> tuple[float | None, str]:
    """(gap closed, the line that explains it). The gap is None, and the line says why, when there
    is no scratch student, or the teacher does not lead it (no gap to close)."""
    if scratch is None or teacher is None or kd is None:
        return None, "gap closed: n/a (no student trained without the teacher in this run)"
    lead = teacher - scratch if higher else scratch - teacher
    if lead <= 1e-12:
        relation = "ties with" if abs(lead) <= 1e-12 else "is below"
        return None, (
            f"gap closed: n/a (the teacher's {metric} {teacher:.4f} {relation} the scratch "
            f"student's {scratch:.4f}: there is no lead to recover; kd {kd:.4f})"
        )
    gap = (kd - scratch) / (teacher - scratch)
    return gap, f"gap closed = (kd - scratch) / (teacher - scratch) = {gap:.2f}"


# --- the two renderers ---------------------------------------------------------------------------


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _cells(summary: Summary, row: ModelResult) -> list[str]:
    # sizes and speeds relative to what the students learned from: the teacher, or the ensemble
    teacher = next((m for m in summary.models if m.role in ("teacher", "ensemble")), None)
    params = "-" if row.parameters is None else f"{row.parameters:,}"
    latency = "-" if row.latency_ms is None else f"{row.latency_ms:.3f} ms"
    if teacher is not None and row is not teacher:
        if row.parameters and teacher.parameters:
            params += f" ({teacher.parameters / row.parameters:.0f}x smaller)"
        if row.latency_ms and teacher.latency_ms:
            latency += f" ({teacher.latency_ms / row.latency_ms:.1f}x faster)"
    return [
        row.name,
        row.role,
        *([row.architecture] if _has(summary, "architecture") else []),
        *([row.teacher or "-"] if _has(summary, "teacher") else []),
        *(_number(row.metrics.get(name)) for name in summary.columns()),
        params,
        "-" if row.size_bytes is None else format_bytes(row.size_bytes),
        latency,
    ]


def _has(summary: Summary, attribute: str) -> bool:
    return any(getattr(row, attribute) for row in summary.models)


def _headers(summary: Summary) -> list[str]:
    return [
        "model",
        "role",
        *(["architecture"] if _has(summary, "architecture") else []),
        *(["learned from"] if _has(summary, "teacher") else []),
        *(f"test {name}" if name == summary.metric else name for name in summary.columns()),
        "parameters",
        "size on disk",
        "CPU latency (batch 1)",
    ]


def _caption(summary: Summary) -> list[str]:
    way = "higher" if summary.higher_is_better else "lower"
    return [f"{summary.metric}: {way} is better; latency: CPU, batch 1, median", *summary.notes]


def table_cells(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """(headers, one row of cells per model): what results.md and the HTML pages show."""
    return _headers(summary), [_cells(summary, row) for row in summary.models]


def markdown_table(summary: Summary) -> str:
    """results.md: the title, the table of every model, the notes and the settings."""
    headers, rows = table_cells(summary)
    lines = [f"# {summary.title}", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", *_caption(summary)]
    if summary.settings:
        lines += ["", "settings:", ""]
        lines += [f"- {key}: {_setting(value)}" for key, value in summary.settings.items()]
    return "\n".join(lines)


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_setting(v) for v in value) + "]"
    return str(value)


def terminal_table(summary: Summary) -> Table:
    """The same models for the terminal, compact: no ratios, 3 decimals, no column that is empty
    in every row (results.md has them all). A terminal narrower than the table folds cells onto
    more lines rather than cutting them ("stude..." told two students apart no more)."""
    columns = summary.columns()
    headers = ["model", "architecture", "learned from", *columns, "params", "size", "ms"]
    rows = []
    for row in summary.models:
        metrics = [row.metrics.get(name) for name in columns]
        rows.append(
            [
                row.name,
                row.architecture or "-",
                row.teacher or "-",
                *(
                    "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                    for v in metrics
                ),
                "-" if row.parameters is None else f"{row.parameters:,}",
                "-" if row.size_bytes is None else format_bytes(row.size_bytes),
                "-" if row.latency_ms is None else f"{row.latency_ms:.3f}",
            ]
        )
    keep = [i for i in range(len(headers)) if i == 0 or any(r[i] != "-" for r in rows)]
    table = Table(
        title=summary.title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for i in keep:
        # the model's name is never folded; a long metric name wraps in its header ("_" -> " ")
        table.add_column(
            headers[i].replace("_", " "),
            justify="left" if i < 3 else "right",
            overflow="fold",
            min_width=max(len(cells[i]) for cells in rows) if rows and i == 0 else None,
        )
    for cells in rows:
        table.add_row(*(cells[i] for i in keep))
    table.caption = "\n".join(_caption(summary))
    table.caption_justify = "left"
    return table
