"""`stillroom cache` end to end through the real CLI: the files and numbers it writes, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, stillroom_in_process
from stillroom.cli import main
from stillroom.config import load_recipe
from stillroom.models import build_model, load_model, save_model
from stillroom.pipeline import prepare_data
from stillroom.store import SoftTargetStore, StoreTeacher, teacher_fingerprint

RECIPE = ROOT / "recipes" / "digits.yaml"
SPEC = {"kind": "cnn", "channels": [4], "hidden": [16]}


def stillroom_here(monkeypatch, capsys, *args: str | Path) -> tuple[int, str, str]:
    """The same `main()` in this process (no interpreter start-up): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["stillroom", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert fragment in message, message


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stillroom teacher folder (model.json + model.safetensors), as `distill` leaves one."""
    folder = tmp_path_factory.mktemp("run") / "teacher"
    torch.manual_seed(0)
    save_model(
        build_model(SPEC, (1, 8, 8), 10), SPEC, folder, input_shape=[1, 8, 8], num_outputs=10
    )
    return folder


def test_cache_writes_a_store_of_the_training_split(tmp_path: Path, teacher_dir: Path) -> None:
    out = tmp_path / "store"
    override = f"teacher.checkpoint={teacher_dir}"
    result = stillroom_in_process(
        "cache", RECIPE, override, "--out", out, "--shard-size", "500", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    _, train = prepare_data(load_recipe(RECIPE, [override]))
    teacher, _ = load_model(teacher_dir)
    assert manifest["complete"] and manifest["kind"] == "dense"
    assert manifest["num_samples"] == len(train) == manifest["dataset"]["count"]
    assert manifest["output_shape"] == [10] and manifest["fields"]["logits"]["dtype"] == "float16"
    assert manifest["teacher"]["sha256"] == teacher_fingerprint(teacher)["sha256"]
    assert manifest["command"].startswith("stillroom cache") and "--out" in manifest["command"]
    assert [s["count"] for s in manifest["shards"]] == [500, 500, len(train) - 1000]
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            assert (out / "shards" / entry["file"]).stat().st_size == entry["bytes"]
    assert manifest["bytes_per_sample"] == 10 * 2 + 8
    assert manifest["generation"]["samples_per_second"] > 0
    assert f"{len(train):,} samples in 3 shard(s)" in " ".join(result.stdout.split())
    # what a student trains from: the teacher's logits for these exact inputs, by sample id
    ids = torch.tensor([0, 17, len(train) - 1])
    cached = StoreTeacher(out, teacher=teacher, data=train)(train.inputs[ids], ids)
    with torch.no_grad():
        torch.testing.assert_close(cached, teacher.eval()(train.inputs[ids]), rtol=1e-3, atol=1e-3)


def test_cache_top_k_with_features(monkeypatch, capsys, tmp_path: Path, teacher_dir: Path) -> None:
    out = tmp_path / "topk"
    code, stdout, err = stillroom_here(
        monkeypatch,
        capsys,
        "cache",
        RECIPE,
        f"teacher.checkpoint={teacher_dir}",
        "--out",
        out,
        "--top-k",
        "3",
        "--precision",
        "q8",
        "--pack-indices",
        "--features",
        "features.2,head.1",
        "--no-progress",
    )
    assert code == 0, err
    store = SoftTargetStore.open(out, verify=True)
    manifest = store.manifest
    assert (manifest.kind, manifest.top_k, manifest.precision) == ("topk", 3, "q8")
    assert manifest.index_encoding == "elias-fano" and manifest.features == ["features.2", "head.1"]
    assert manifest.fields["topk_logprobs"] == {"dtype": "uint8", "shape": [3]}
    assert manifest.fields["feature.features.2"]["shape"] == [4, 8, 8]
    assert manifest.fields["feature.head.1"]["shape"] == [16]
    assert (
        0 <= manifest.fidelity["kl_mean"] < 1
        and manifest.fidelity["bytes_per_position"] == 3 + 2 + 2
    )
    assert "top-3: KL(full || stored)" in stdout and "k=    6" in stdout
    assert store.topk([0, 1]).indices.shape == (2, 3)


def test_missing_teacher_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    result = stillroom_in_process("cache", RECIPE, "--out", tmp_path / "store")
    assert_one_line_error(
        result.returncode, result.stderr, "stillroom cache needs a trained teacher"
    )
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--top-k", "11"], "top-k 11 is larger than the teacher's 10 classes"),
        (
            ["--features", "features.9"],
            "no module named 'features.9' to capture features from; closest: features.",
        ),
        (["--precision", "q8"], "precision q8 quantises top-k log-probabilities"),
        (["--precision", "bf16"], "precision must be one of fp32, fp16, q8"),
        (["--resume", "--force"], "--resume and --force contradict each other"),
    ],
)
def test_bad_options_give_one_line(
    monkeypatch, capsys, tmp_path: Path, teacher_dir: Path, extra: list[str], fragment: str
) -> None:
    out = tmp_path / "store"
    args = ["cache", RECIPE, f"teacher.checkpoint={teacher_dir}", "--out", out, *extra]
    code, _, err = stillroom_here(monkeypatch, capsys, *args, "--no-progress")
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_existing_store_needs_force(monkeypatch, capsys, tmp_path: Path, teacher_dir: Path) -> None:
    out = tmp_path / "store"
    args = ["cache", RECIPE, f"teacher.checkpoint={teacher_dir}", "--out", out, "--no-progress"]
    assert stillroom_here(monkeypatch, capsys, *args)[0] == 0
    before = (out / "shards" / "00000.logits.npy").read_bytes()
    code, _, err = stillroom_here(monkeypatch, capsys, *args)
    assert_one_line_error(
        code, err, "already exists; pass --resume to continue it, --force to replace it"
    )
    code, _, err = stillroom_here(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert (out / "shards" / "00000.logits.npy").read_bytes() == before
    code, _, err = stillroom_here(monkeypatch, capsys, *args, "--top-k", "2", "--resume")
    assert_one_line_error(code, err, "cannot resume the store")
    code, _, err = stillroom_here(monkeypatch, capsys, *args, "--precision", "fp32", "--force")
    assert code == 0, err
    assert SoftTargetStore.open(out).manifest.precision == "fp32"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["teacher.checkpoint=no/such/teacher"], "model folder no/such/teacher does not exist"),
        (["teacher.checkpoint={teacher}", "data.source=diabetes"], "but the data has (10,) and 1"),
    ],
)
def test_unusable_teacher(
    monkeypatch, capsys, tmp_path: Path, teacher_dir: Path, overrides, fragment
) -> None:
    overrides = [o.format(teacher=teacher_dir) for o in overrides]
    code, _, err = stillroom_here(
        monkeypatch, capsys, "cache", RECIPE, *overrides, "--out", tmp_path / "s"
    )
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("top_k", [None, 3])
def test_distill_reads_the_store(
    monkeypatch, tmp_path: Path, teacher_dir: Path, top_k: int | None
) -> None:
    """cache, then distill with teacher.store: the student learns from the store (dense or top-k),
    and the teacher never runs over the training inputs again."""
    store = tmp_path / "store"
    override = f"teacher.checkpoint={teacher_dir}"
    extra = ["--top-k", str(top_k)] if top_k else ["--precision", "fp32"]
    assert (
        stillroom_in_process(
            "cache", RECIPE, override, "--out", store, *extra, "--no-progress"
        ).returncode
        == 0
    )
    loss = ["distill.loss=topk_soft_target"] if top_k else []
    out = tmp_path / "run"

    def no_live_teacher(*args, **kwargs):
        raise AssertionError("a run given a store ran the teacher over the training inputs")

    monkeypatch.setattr("stillroom.methods.classic.generate_soft_targets", no_live_teacher)
    result = stillroom_in_process(
        "distill",
        RECIPE,
        override,
        f"teacher.store={store}",
        *loss,
        "distill.epochs=2",
        "student.hidden=[8]",
        "baseline=false",
        "--out",
        out,
        "--no-progress",
        "--no-report",
    )
    assert result.returncode == 0, result.stderr
    records = [
        json.loads(x) for x in (out / "student_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 2 and records[0]["train/distillation"] > 0
    assert not (out / "soft_targets.safetensors").exists()


def test_distill_refuses_a_store_of_another_teacher(tmp_path: Path, teacher_dir: Path) -> None:
    store = tmp_path / "store"
    assert (
        stillroom_in_process(
            "cache", RECIPE, f"teacher.checkpoint={teacher_dir}", "--out", store, "--no-progress"
        ).returncode
        == 0
    )
    other = tmp_path / "other"
    torch.manual_seed(1)
    save_model(build_model(SPEC, (1, 8, 8), 10), SPEC, other, input_shape=[1, 8, 8], num_outputs=10)
    result = stillroom_in_process(
        "distill",
        RECIPE,
        f"teacher.checkpoint={other}",
        f"teacher.store={store}",
        "distill.epochs=1",
        "baseline=false",
        "--out",
        tmp_path / "run",
        "--no-progress",
        "--no-report",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "teacher" in result.stderr and result.stderr.startswith("error: ")
    assert not (tmp_path / "run").exists()  # refused before anything was trained: nothing left
