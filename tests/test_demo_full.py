"""The full demo as a user runs it (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_full_demo_under_three_minutes_and_distillation_helps_with_few_labels(
    tmp_path: Path,
) -> None:
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stillroom.cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 180, f"demo took {elapsed:.0f} s"
    few = json.loads((tmp_path / "demo" / "few_labels" / "results.json").read_text())["models"]
    assert few["student_kd"]["accuracy"] > few["student_scratch"]["accuracy"]
    assert few["teacher"]["parameters"] >= 10 * few["student_kd"]["parameters"]
