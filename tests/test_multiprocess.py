"""Two CPU processes (torchrun, gloo) give the single-process result with the same global batch,
and only rank 0 writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, stillroom_in_process, tree_digest

API_SCRIPT = """
import json, os, sys, torch
from torch import nn
from stillroom.data import ArrayData, make_loader
from stillroom.train import TrainArgs, distill
torch.manual_seed(0)
x = torch.randn(512, 8)
y = (x[:, 0] + x[:, 1] > 0).long()
student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
batch = int(sys.argv[1])
result = distill(None, student, make_loader(ArrayData(x, y, "classification", 2, "s"), batch, True),
                 args=TrainArgs(epochs=2, lr=0.1, alpha=0.0, progress=False, seed=0))
flat = torch.cat([p.detach().flatten() for p in result.student.parameters()])
out = {"params": flat.tolist(), "loss": result.history[-1]["train/loss"]}
# one file per process: two processes printing to one pipe may interleave their lines
with open(f"{sys.argv[2]}.{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump(out, f)
"""

TINY = [
    "teacher.kind=mlp",
    "teacher.hidden=[16]",
    "teacher.train.epochs=2",
    "student.hidden=[8]",
    "distill.epochs=2",
    "baseline=false",
    "--no-report",
    "--no-progress",
]


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    two = torchrun(tmp_path, str(script), "32", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("two.*.json"))]
    subprocess.run([sys.executable, str(script), "64", str(tmp_path / "one")], check=True)
    single = json.loads((tmp_path / "one.0.json").read_text())
    assert len(ranks) == 2
    for rank in ranks:  # same models in both processes, and as one process with batch 64
        assert rank["params"] == pytest.approx(single["params"], abs=1e-5)
        assert rank["loss"] == pytest.approx(single["loss"], rel=1e-5)  # over all processes


@pytest.mark.slow  # ~25 s quiet, three torchrun launches: `pytest -m slow`
def test_distill_under_torchrun_writes_one_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    two = torchrun(
        tmp_path, "-m", "stillroom.cli", "distill", "recipes/digits.yaml", *TINY, "--out", str(out)
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("run folder:") == 1  # rank 0 alone prints
    summary = json.loads((out / "summary.json").read_text())
    assert {m["name"] for m in summary["models"]} >= {"teacher", "student_kd"}
    for phase in ("teacher", "student_kd"):
        assert (out / phase / "done.json").is_file()
        assert (out / phase / "model.safetensors").is_file()
    assert not list((tmp_path / "tmp").glob("stillroom-rank*"))  # rank 1's scratch is gone
    # the same global batch in one process: close (the last, uneven batch is padded across ranks)
    single = tmp_path / "single"
    result = stillroom_in_process(
        "distill", "recipes/digits.yaml", *TINY, "data.batch_size=128", "--out", single
    )
    assert result.returncode == 0, result.stderr

    def last_val(folder: Path) -> float:
        lines = (folder / "teacher" / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["val/loss"]

    assert last_val(out) == pytest.approx(last_val(single), rel=0.05)

    # and a resume under torchrun continues (every phase done: nothing retrained, nothing raced)
    def models(folder: Path) -> dict[str, str]:
        return {k: v for k, v in tree_digest(folder).items() if k.endswith("model.safetensors")}

    before = models(out)
    again = torchrun(
        tmp_path,
        "-m",
        "stillroom.cli",
        "distill",
        "recipes/digits.yaml",
        *TINY,
        "--out",
        str(out),
        "--resume",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert models(out) == before
