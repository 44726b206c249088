"""The result contract: summary.json round trip, the gap-closed line, the two renderers."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from stillroom.errors import StillroomError
from stillroom.results import (
    ROLES,
    ModelResult,
    Summary,
    gap_note,
    markdown_table,
    read_summary,
    terminal_table,
    write_summary,
)


def summary(**changes: object) -> Summary:
    models = [
        ModelResult("teacher", "teacher", {"accuracy": 0.98}, "teacher", 151_000, 600_000, 0.2),
        ModelResult(
            "student_scratch",
            "baseline",
            {"accuracy": 0.90, "teacher_agreement": 0.91},
            "student_scratch",
            4_800,
            20_000,
            0.02,
        ),
        ModelResult(
            "student_kd",
            "distilled",
            {"accuracy": 0.96, "teacher_agreement": 0.97},
            "student_kd",
            4_800,
            20_000,
            0.02,
            teacher="teacher",
        ),
    ]
    fields: dict = dict(
        method="classic", title="digits: test set", task="classification", metric="accuracy",
        higher_is_better=True, models=models, settings={"distillation": "T 4.0, alpha 0.9"},
        notes=["gap closed = 0.75"], primary="student_kd",
    )  # fmt: skip
    return Summary(**{**fields, **changes})


def test_summary_round_trip_and_results_md(tmp_path: Path) -> None:
    write_summary(summary(), tmp_path)
    back = read_summary(tmp_path)
    assert back == summary()
    assert back.model("student_kd").metrics["teacher_agreement"] == 0.97
    text = (tmp_path / "results.md").read_text()
    assert "| student_kd | distilled | teacher | 0.9600 | 0.9700 | 4,800 (31x smaller) |" in text
    assert "gap closed = 0.75" in text and "- distillation: T 4.0, alpha 0.9" in text
    with pytest.raises(StillroomError, match=r"has no model 'gen-1'; it has: teacher, student_"):
        back.model("gen-1")


def test_unfinished_run_has_no_summary(tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match=r"holds no summary.json: the run has not finished"):
        read_summary(tmp_path)


def test_roles_are_the_contracts() -> None:
    assert ROLES == (
        "teacher", "baseline", "distilled", "exit", "generation", "member", "ensemble", "client",
        "task",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("teacher", "scratch", "kd", "higher", "gap", "says"),
    [
        (0.98, 0.90, 0.96, True, 0.75, "= 0.75"),
        # the demo's setting (a): the teacher below the scratch student
        (0.9833, 0.9861, 0.9850, True, None, "teacher's accuracy 0.9833 is below the scratch"),
        (0.95, 0.95, 0.96, True, None, "ties with the scratch student's 0.9500"),
        (2.0, 3.0, 2.5, False, 0.5, "= 0.50"),  # rmse: lower is better
        (3.0, 2.0, 2.5, False, None, "is below the scratch"),
        (0.98, None, 0.96, True, None, "no student trained without the teacher"),
    ],
)
def test_gap_note_says_what_is(
    teacher: float, scratch: float | None, kd: float, higher: bool, gap: float | None, says: str
) -> None:
    value, line = gap_note(teacher, scratch, kd, "accuracy", higher)
    assert value == (None if gap is None else pytest.approx(gap))
    assert says in line


def test_terminal_table_fits_80_columns_and_cuts_nothing() -> None:
    console = Console(width=80, record=True)
    console.print(terminal_table(summary()))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    for cell in ("student_scratch", "student_kd", "151,000", "19.5 KiB", "0.970"):
        assert cell in text
    assert "…" not in text and "..." not in text
    # results.md: header, rule, three models
    assert markdown_table(summary()).count("\n|") == 5


def test_cli_console_off_a_terminal_is_wide() -> None:
    from stillroom.cli.common import console

    assert console.width >= 200  # pytest's stdout is not a terminal: no 80-column cut
