"""Ranking distillation end to end on a generated interactions file (no download): the split,
the metrics by hand, the CLI run with its files and numbers, export, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_user_error, stillroom_in_process
from stillroom.data.interactions import (
    Columns,
    eval_candidates,
    make_interactions,
    prepare_interactions,
    read_interactions,
)
from stillroom.methods.ranking_eval import candidate_metrics

RECIPE = Path(__file__).parent.parent / "recipes" / "ranking_tiny.yaml"
TINY = ["serving_repeats=3"]  # the recipe is tiny already; fewer timed calls


@pytest.fixture(scope="module")
def interactions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_interactions(tmp_path_factory.mktemp("data") / "interactions.csv")


@pytest.fixture(scope="module")
def finished(interactions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = stillroom_in_process(
        "distill", RECIPE, f"data.path={interactions}", *TINY, "--out", out, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    return out


def test_leave_last_out_split_by_time() -> None:
    raw = {
        "user": np.array(["a", "a", "a", "a", "b", "b", "b", "c"], dtype=object),
        "item": np.array([1, 2, 3, 4, 1, 2, 5, 1]),
        "rating": np.array([5, 4, 2, 5, 5, 5, 4, 5], dtype=float),
        "timestamp": np.array([4, 1, 9, 2, 3, 1, 2, 1], dtype=float),
    }
    data = prepare_interactions(raw, 4.0, 3, "t")
    assert data.user_ids == ["a", "b"] and data.dropped_users == 1  # c has 1 positive
    assert data.item_ids == [1, 2, 3, 4, 5]
    # a's positives in time order: 2 (t1), 4 (t2), 1 (t4); the 3 rated 2 is no positive
    assert data.item_ids[data.test_items[0]] == 1 and data.item_ids[data.val_items[0]] == 4
    assert data.item_ids[data.test_items[1]] == 1 and data.item_ids[data.val_items[1]] == 5
    assert sorted(zip(data.train_users.tolist(), data.train_items.tolist(), strict=True)) == [
        (0, 1),
        (1, 1),
    ]
    rows = eval_candidates(data, data.test_items, 1, seed=0)
    assert rows.shape == (2, 3)
    for u, row in enumerate(rows):  # negatives never seen by the user, the positive first
        assert row[0] == u and not set(row[2:]) & set(data.seen[u].tolist())
    assert (rows == eval_candidates(data, data.test_items, 1, seed=0)).all()


def test_candidate_metrics_by_hand() -> None:
    # user 0: positive ranked first; user 1: two negatives above it (rank 2), one tie
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 3.0, 1.0]])
    m = candidate_metrics(scores, k=2)
    assert m["hr@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert m["auc"] == pytest.approx((1.0 + 0.5 / 3) / 2)
    assert candidate_metrics(scores, k=10)["ndcg@10"] == pytest.approx((1 + 1 / np.log2(5)) / 2)


def test_run_writes_every_model_and_the_onnx_student(finished: Path) -> None:
    summary = json.loads((finished / "summary.json").read_text())
    rows = {m["name"]: m for m in summary["models"]}
    assert set(rows) == {
        "ensemble", "teacher_0", "teacher_1", "student_scratch", "student_pointwise",
        "student_ranking", "student_listwise", "student_relaxed",
    }  # fmt: skip
    assert rows["ensemble"]["role"] == "ensemble" and rows["teacher_0"]["role"] == "member"
    assert rows["student_scratch"]["role"] == "baseline"
    assert summary["primary"] in rows and rows[summary["primary"]]["role"] == "distilled"
    for row in rows.values():
        for key in ("ndcg@10", "hr@10", "auc", "ndcg@10_40neg", "recall@20_full", "users_per_s"):
            assert 0 <= row["metrics"][key] <= (1 if key != "users_per_s" else 1e9), (row, key)
        assert row["latency_ms"] > 0 and row["parameters"] > 0
    # the student is at most 10% of the teacher it learned from
    assert rows["student_scratch"]["parameters"] <= 0.1 * rows["teacher_0"]["parameters"]
    ids = json.loads((finished / "ids.json").read_text())
    assert len(ids["users"]) == 60 and ids["items"][0].startswith("i")
    manifest = json.loads((finished / "onnx" / "manifest.json").read_text())
    assert manifest["passed"] and manifest["inputs"][0]["dtype"] == "int64"
    assert (finished / "results.md").read_text().count("student_") >= 5


@pytest.mark.slow
def test_resume_loads_every_phase(finished: Path, interactions: Path) -> None:
    before = {
        p: (finished / p / "model.safetensors").read_bytes()
        for p in ("teacher_0", "student_ranking")
    }
    result = stillroom_in_process(
        "distill",
        RECIPE,
        f"data.path={interactions}",
        *TINY,
        "--out",
        finished,
        "--resume",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    for p, weights in before.items():
        assert (finished / p / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_export_reads_the_run_folder(finished: Path, tmp_path: Path) -> None:
    result = stillroom_in_process(
        "export", finished, "--out", tmp_path / "export", "--format", "onnx"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "export" / "model.onnx").is_file()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "overrides", "fragment"),
    [
        ("person,movie\n1,2\n", [], "has no user column 'user'"),
        ("user,item,rating,timestamp\n1.5,2,5,1\n", [], "ids must be integers or strings"),
        (None, ["data.eval_negatives=[500]"], "500 sampled negatives per user, but the catalogue"),
        (None, ["data.min_positives=30"], "no user has 30 or more positive interactions"),
        (None, ["data.drop_sparse_users=false", "data.min_positives=12"], "drop_sparse_users"),
        (None, ["data.rating_column=null"], "positive_threshold needs rating_column"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    body: str | None, overrides: list[str], fragment: str, interactions: Path, tmp_path: Path
) -> None:
    path = interactions if body is None else _write(tmp_path / "bad.csv", body)
    out = tmp_path / "run"
    result = stillroom_in_process("distill", RECIPE, f"data.path={path}", *overrides, "--out", out)
    assert_user_error(result, fragment)
    assert not out.exists()


def test_reads_parquet_json_and_inter_files(interactions: Path, tmp_path: Path) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.json  # noqa: F401
    import pyarrow.parquet as pq

    table = pcsv.read_csv(interactions)
    pq.write_table(table, tmp_path / "x.parquet")
    lines = [json.dumps(r) for r in table.to_pylist()]
    _write(tmp_path / "x.jsonl", "\n".join(lines) + "\n")
    inter = ["user:token\titem:token\trating:float\ttimestamp:float"]
    inter += ["\t".join(str(v) for v in r.values()) for r in table.to_pylist()]
    _write(tmp_path / "x.inter", "\n".join(inter) + "\n")
    columns = Columns("user", "item", "rating", "timestamp")
    reference = read_interactions(interactions, columns)
    for name in ("x.parquet", "x.jsonl", "x.inter"):
        got = read_interactions(tmp_path / name, columns)
        assert list(got["user"]) == list(reference["user"]), name
        assert np.allclose(got["rating"], reference["rating"]), name
