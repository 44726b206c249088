"""The compression report: its numbers against a direct measurement, a self-contained HTML page
with every figure, regression runs, a teacher loaded from a checkpoint, and (slow) a real browser."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stillroom.cli import app
from stillroom.config import load_recipe
from stillroom.methods.classic import run_recipe
from stillroom.models import load_model
from stillroom.pipeline import ROLES, prepare_data
from stillroom.report import Timing, build_report, reliability
from stillroom.report.build import read_curves
from stillroom.report.figures import curves

ROOT = Path(__file__).parent.parent
TINY = [
    "teacher.channels=[4]",
    "teacher.hidden=[16]",
    "teacher.train.epochs=2",
    "student.hidden=[8]",
    "distill.epochs=2",
]
FAST = Timing(warmup=2, repeats=10, large_batch=32, large_repeats=3)
CLASSIFICATION_FIGURES = {"tradeoff", "costs", "curves", "reliability", "per_class"}


# module-scoped: a second thread only waits on this shared 2-core machine (see conftest)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classification(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("report") / "run"
    run_recipe(load_recipe(None, TINY), run, progress=False)
    html = build_report(run, timing=FAST)
    assert html == run / "report" / "report.html"
    return run, json.loads((html.parent / "report.json").read_text())


def ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al. (2017) as usually written: equal-width bins (lo, hi] of top-1 confidence."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        members = (confidence > lo) & (confidence <= hi)
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def test_numbers_match_a_direct_measurement(classification: tuple[Path, dict]) -> None:
    run, numbers = classification
    test = prepare_data(load_recipe(run / "config.yaml"))[0].test
    labels = test.targets.numpy()
    assert numbers["task"] == "classification" and numbers["metric"] == "accuracy"
    assert numbers["test_samples"] == len(test)
    logits = {}
    for role in ROLES:
        model, _ = load_model(run / role)
        with torch.no_grad():
            logits[role] = model.eval()(test.inputs).numpy()
    for role in ROLES:
        row = numbers["models"][role]
        model, _ = load_model(run / role)
        predicted = logits[role].argmax(1)
        assert row["accuracy"] == pytest.approx((predicted == labels).mean())
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
        assert row["size_bytes"] == (run / role / "model.safetensors").stat().st_size
        probs = torch.from_numpy(logits[role]).softmax(1).numpy()
        assert row["ece"] == pytest.approx(ece_reference(probs, labels), abs=1e-6)
        assert sum(b["count"] for b in row["reliability"]) == len(test)
        for cls, accuracy in enumerate(row["per_class_accuracy"]):
            assert accuracy == pytest.approx((predicted[labels == cls] == cls).mean())
        if role == "teacher":
            assert "teacher_agreement" not in row
        else:
            expected = (predicted == logits["teacher"].argmax(1)).mean()
            assert row["teacher_agreement"] == pytest.approx(expected)
        teacher = numbers["models"]["teacher"]
        assert row["retention"] == pytest.approx(row["accuracy"] / teacher["accuracy"])
        for batch in (1, FAST.large_batch):
            latency = row[f"latency_batch_{batch}"]
            assert 0 < latency["p50_ms"] <= latency["p95_ms"]
            assert row[f"throughput_batch_{batch}_per_s"] == pytest.approx(
                batch * 1000 / latency["p50_ms"]
            )
        state = model.state_dict().values()
        assert row["weight_bytes"] == sum(t.numel() * t.element_size() for t in state)
        # a forward of 32 samples allocates at least its (32, 10) float32 output
        assert row[f"forward_peak_bytes_batch_{FAST.large_batch}"] >= 32 * 10 * 4
        assert row["peak_memory_bytes"] > row["weight_bytes"]
    rows = numbers["models"]
    kd, scratch, teacher = (
        rows[r]["accuracy"] for r in ("student_kd", "student_scratch", "teacher")
    )
    if teacher != scratch:
        assert numbers["gap_closed"] == pytest.approx((kd - scratch) / (teacher - scratch))
    # the pipeline's own table measured the same accuracies on the same split
    results = json.loads((run / "results.json").read_text())
    for role in ROLES:
        assert results["models"][role]["accuracy"] == pytest.approx(rows[role]["accuracy"])
    assert numbers["measurement"]["timing"] == FAST.as_dict()


def test_reliability_limiting_cases() -> None:
    targets = torch.tensor([0, 1, 2, 0])
    certain_and_right = torch.nn.functional.one_hot(targets, 3).float() * 50
    assert reliability(certain_and_right, targets)["ece"] == pytest.approx(0.0, abs=1e-6)
    # confidence 0.5 everywhere, always right: the gap is 0.5
    half = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).repeat(4, 1)
    assert reliability(half, torch.zeros(4, dtype=torch.long))["ece"] == pytest.approx(0.5)


def test_html_is_self_contained_with_every_figure(classification: tuple[Path, dict]) -> None:
    run, numbers = classification
    folder = run / "report"
    page = (folder / "report.html").read_text()
    assert set(numbers["figures"]) == CLASSIFICATION_FIGURES
    assert page.count('src="data:image/png;base64,') == len(CLASSIFICATION_FIGURES)
    for name, file in numbers["figures"].items():
        png = (folder / file).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5_000, name
        assert base64.b64encode(png).decode() in page, f"{name} is not embedded"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for text in ("Quality on the test split", "Costs on this machine", "gap closed", "ECE"):
        assert text in page


def test_curves_follow_every_logged_key(classification: tuple[Path, dict], tmp_path: Path) -> None:
    run, numbers = classification
    records = [
        json.loads(x) for x in (run / "student_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = {k for r in records for k in r if k.startswith(("train/", "val/"))}
    assert set(numbers["curves"]["student_kd"]) == logged | {"epoch"}
    assert {"train/distillation", "train/hard_label", "val/accuracy"} <= logged
    # a loss term added later (here, by hand) gets its own panel without any code change
    shutil.copytree(run / "student_kd", tmp_path / "student_kd")
    records[0]["train/new_term"] = 0.5
    (tmp_path / "student_kd" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    found = read_curves(tmp_path, ("teacher", "student_kd"))
    assert list(found) == ["student_kd"]  # no teacher log here: no teacher curves, no error
    assert found["student_kd"]["train/new_term"][:2] == [0.5, None]
    figure = curves({"curves": found})
    assert "train/new_term" in {ax.get_title() for ax in figure.axes}


def test_regression_report_through_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "regression"
    recipe = load_recipe(
        ROOT / "recipes" / "diabetes_regression.yaml",
        ["teacher.train.epochs=2", "distill.epochs=2"],
    )
    run_recipe(recipe, run, progress=False)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert str(out / "report.html") in result.output
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["metric"] == "rmse" and numbers["higher_is_better"] is False
    assert set(numbers["figures"]) == {"tradeoff", "costs", "curves"}
    assert numbers["measurement"]["machine"]["torch_threads"] == 1
    test = prepare_data(recipe)[0].test
    teacher_rmse = numbers["models"]["teacher"]["rmse"]
    for role, row in numbers["models"].items():
        assert not {"ece", "teacher_agreement", "per_class_accuracy", "accuracy"} & set(row)
        model, _ = load_model(run / role)
        with torch.no_grad():
            outputs = model.eval()(test.inputs).view(test.targets.shape)
        rmse = ((outputs - test.targets) ** 2).mean().sqrt().item()
        assert row["rmse"] == pytest.approx(rmse, rel=1e-5)
        assert row["retention"] == pytest.approx(teacher_rmse / row["rmse"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "test rmse" in page


def test_teacher_from_a_checkpoint_and_no_baseline(
    classification: tuple[Path, dict], tmp_path: Path
) -> None:
    source, _ = classification
    run = tmp_path / "from_checkpoint"
    recipe = load_recipe(
        None, [*TINY, f"teacher.checkpoint={source / 'teacher'}", "baseline=false"]
    )
    run_recipe(recipe, run, progress=False)
    numbers_path = build_report(run, tmp_path / "out", timing=FAST).parent / "report.json"
    numbers = json.loads(numbers_path.read_text())
    assert set(numbers["models"]) == {"teacher", "student_kd"}
    assert set(numbers["curves"]) == {"student_kd"}
    assert numbers["gap_closed"] is None
    page = (tmp_path / "out" / "report.html").read_text()
    assert "No curves for: teacher" in page and "gap closed: n/a" in page


@pytest.mark.slow
def test_report_renders_in_a_real_browser(
    classification: tuple[Path, dict], tmp_path: Path
) -> None:
    chromium = Path("/usr/bin/chromium")
    if not chromium.is_file():
        pytest.skip("needs /usr/bin/chromium: apt-get install -y chromium chromium-driver")
    from PIL import Image

    run, _ = classification
    out = tmp_path / "report"
    made = subprocess.run(
        [sys.executable, "-m", "stillroom.cli", "report", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(chromium),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20, "the page rendered (nearly) blank"
    assert (pixels.min(axis=2) < 200).mean() > 0.02, "the page is (nearly) all white"
    # the figures drew: matplotlib's tab:blue (the distilled student) and tab:orange are on screen
    for rgb in ((31, 119, 180), (255, 127, 14)):
        close = (np.abs(pixels - np.array(rgb)).max(axis=2) < 12).sum()
        assert close > 200, f"colour {rgb} from the figures is missing"
