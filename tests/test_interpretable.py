"""method interpretable: the students' maths and files, then the shipped recipes made tiny through
the real CLI (distill, report, export with parity), and bad input in one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_user_error, stillroom_in_process
from stillroom.interpretable import STUDENTS, Fitting, generate_near, load_student, save_student
from stillroom.interpretable.students import scores

ROOT = Path(__file__).parent.parent
DIGITS = ROOT / "recipes" / "digits_interpretable.yaml"
CANCER = ROOT / "recipes" / "breast_cancer_interpretable.yaml"
TINY = [
    "teacher.train.epochs=2",
    "students.generated=400",
    "students.max_depth=4",
    "students.max_iter=200",
]
DIGITS_TINY = ["teacher.channels=[4, 8]", "teacher.hidden=[16]"]
CANCER_TINY = ["teacher.hidden=[16]"]
OPTIONS = {"max_depth": 3, "min_samples_leaf": 1, "C": 0.5, "lasso_alpha": 0.02, "max_iter": 500}


def _two_blobs(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, 1] += 3 * y  # feature 1 separates the classes
    return x, y


def test_generated_samples_stay_near_the_data_and_in_range() -> None:
    x = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    near = generate_near(x, 500, 0.3, seed=1)
    assert near.shape == (500, 3) and near.dtype == x.dtype
    assert (near >= x.min(0)).all() and (near <= x.max(0)).all()
    assert generate_near(x, 0, 0.3, seed=1).shape == (0, 3)
    assert np.array_equal(near, generate_near(x, 500, 0.3, seed=1))  # seeded
    assert np.array_equal(generate_near(x, 10, 0.0, seed=2), generate_near(x, 10, 0.0, seed=2))


def test_tree_fits_labels_and_the_teachers_probabilities_to_its_depth() -> None:
    x, y = _two_blobs()
    tree = STUDENTS["tree"]
    labels = tree.fit_labels(Fitting(x, y), 2, OPTIONS)
    probabilities = np.stack([1 - y, y], 1).astype(np.float64) * 0.8 + 0.1
    distilled = tree.fit_teacher(Fitting(x, y, probabilities, None), 2, OPTIONS)
    for est in (labels, distilled):
        size = tree.size(est)
        assert size["depth"] <= 3 and size["leaves"] >= 2 and size["nonzeros"] is None
        assert (scores(est, x).argmax(1) == y).mean() > 0.95
    # the regression tree reproduces the teacher's probabilities where they are constant
    assert np.allclose(scores(distilled, x).sum(1), 1.0)
    text = tree.rules(labels, ["a", "b", "c", "d"], ["no", "yes"])
    assert text.startswith("if b <= ") and "-> class yes" in text


def test_sparse_linear_gets_sparser_with_a_stronger_penalty() -> None:
    x, y = _two_blobs()
    linear = STUDENTS["sparse_linear"]
    score = (
        x[:, 1] - 1.5 + 0.05 * x[:, 0] + 0.05 * x[:, 2] + 0.05 * x[:, 3]
    )  # small weights elsewhere
    logits = np.stack([-score, score], 1)
    weak = linear.fit_teacher(Fitting(x, y, None, logits), 2, {**OPTIONS, "lasso_alpha": 1e-3})
    strong = linear.fit_teacher(Fitting(x, y, None, logits), 2, {**OPTIONS, "lasso_alpha": 0.5})
    assert linear.size(strong)["nonzeros"] < linear.size(weak)["nonzeros"]
    assert linear.size(strong)["nonzeros"] >= 1  # feature 1 carries the logits
    # the classes overlap (means 3 apart, unit spread): the best linear rule gets ~0.93
    assert (scores(weak, x).argmax(1) == y).mean() > 0.88
    labels = linear.fit_labels(Fitting(x, y), 2, OPTIONS)
    assert (scores(labels, x).argmax(1) == y).mean() > 0.88
    assert "z(b)" in linear.rules(labels, ["a", "b", "c", "d"], ["no", "yes"])


def test_rule_list_rebuilt_as_a_tree_predicts_as_imodels_does() -> None:
    imodels = pytest.importorskip("imodels")
    x, y = _two_blobs(300, seed=3)
    x[:, 2] += 1.5 * (y == 1) * (x[:, 0] > 0)
    rules = STUDENTS["rule_list"]
    chain = rules.fit_labels(Fitting(x, y), 2, OPTIONS)
    reference = imodels.GreedyRuleListClassifier(max_depth=3).fit(x, y)
    assert np.array_equal(scores(chain, x).argmax(1), reference.predict(x))
    size = rules.size(chain)
    assert size["rules"] == size["leaves"] - 1 <= 3
    text = rules.rules(chain, ["a", "b", "c", "d"], ["no", "yes"]).splitlines()
    assert text[0].startswith("IF ") and text[-1].startswith("ELSE class ")


def test_student_folder_round_trips_without_pickle(tmp_path: Path) -> None:
    x, y = _two_blobs()
    est = STUDENTS["tree"].fit_labels(Fitting(x, y), 2, OPTIONS)
    save_student(est, tmp_path / "s", {"kind": "tree", "features": 4}, "rules")
    again, info = load_student(tmp_path / "s")
    assert info["kind"] == "tree" and np.array_equal(again.predict(x), est.predict(x))
    with (tmp_path / "s" / "model.skops").open("rb") as f:
        assert f.read(2) == b"PK"  # a skops zip, not a pickle stream


# --- the CLI, end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both recipes made tiny: digits (tree, sparse linear) and the breast-cancer CSV (all three)."""
    from sklearn.datasets import load_breast_cancer

    base = tmp_path_factory.mktemp("interpretable")
    cancer = load_breast_cancer()
    header = [n.replace(" ", "_") for n in cancer.feature_names] + ["diagnosis"]
    rows = [
        ",".join([*map(str, row), cancer.target_names[t]])
        for row, t in zip(cancer.data, cancer.target, strict=True)
    ]
    csv = base / "breast_cancer.csv"
    csv.write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    out = {"digits": base / "digits", "cancer": base / "cancer"}
    for name, recipe, extra in (
        ("digits", DIGITS, DIGITS_TINY),
        ("cancer", CANCER, [*CANCER_TINY, f"data.path={csv}"]),
    ):
        result = stillroom_in_process(
            "distill", recipe, *TINY, *extra, "--out", out[name], "--no-progress", "--no-report"
        )
        assert result.returncode == 0, result.stderr
    return out


def test_run_writes_every_student_both_ways_with_its_numbers(runs: dict[str, Path]) -> None:
    for name, kinds in (("digits", ["tree", "sparse_linear"]), ("cancer", list(STUDENTS))):
        run = runs[name]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"] == "interpretable" and summary["primary"] == "tree_distilled"
        names = [m["name"] for m in summary["models"]]
        assert names == ["teacher", *(f"{k}_{w}" for k in kinds for w in ("labels", "distilled"))]
        results = json.loads((run / "results.json").read_text())["models"]
        for kind in kinds:
            for way in ("labels", "distilled"):
                row = results[f"{kind}_{way}"]
                assert 0 <= row["accuracy"] <= 1 and 0 <= row["fidelity"] <= 1
                assert row["latency_ms"] > 0 and row["size_bytes"] > 0
                folder = run / f"{kind}_{way}"
                assert {p.name for p in folder.iterdir()} >= {
                    "model.skops",
                    "student.json",
                    "rules.txt",
                    "done.json",
                }
                if kind == "sparse_linear":
                    assert row["nonzeros"] >= 1 and row["depth"] is None
                else:
                    assert 1 <= row["depth"] <= 4 and row["leaves"] >= 2
        rules = (run / "texts" / "rules.md").read_text()
        assert all(f"## {k}_distilled" in rules for k in kinds)
    cancer_rules = (runs["cancer"] / "tree_labels" / "rules.txt").read_text()
    assert "worst_" in cancer_rules or "mean_" in cancer_rules  # the table's column names
    rule_list = (runs["cancer"] / "rule_list_distilled" / "rules.txt").read_text().splitlines()
    assert rule_list[0].startswith("IF ") and rule_list[-1].startswith("ELSE class ")


def test_export_converts_the_distilled_tree_with_parity_on_the_test_split(
    runs: dict[str, Path],
) -> None:
    result = stillroom_in_process("export", runs["cancer"])
    assert result.returncode == 0, result.stderr
    manifest = json.loads((runs["cancer"] / "export" / "manifest.json").read_text())
    assert manifest["source"]["role"] == "tree_distilled" and manifest["source"]["split"] == "test"
    onnx = manifest["parity"]["formats"]["onnx"]
    assert manifest["passed"] and onnx["max_abs_diff"] <= onnx["allowed"]
    assert onnx["top1_agreement"] == 1.0
    assert manifest["parity"]["checked_samples"] == 113  # the test split: 20% of 569 tumours
    # any student folder, on inputs drawn inside the training range
    folder = runs["digits"] / "sparse_linear_labels"
    result = stillroom_in_process("export", folder, "--out", folder.parent / "linear_onnx")
    assert result.returncode == 0, result.stderr
    assert (folder.parent / "linear_onnx" / "model.onnx").is_file()
    assert_user_error(stillroom_in_process("export", folder, "--int8"), "drop --int8")


def test_report_shows_the_rules(runs: dict[str, Path]) -> None:
    result = stillroom_in_process("report", runs["digits"])
    assert result.returncode == 0, result.stderr
    html = (runs["digits"] / "report" / "report.html").read_text()
    assert "tree_distilled" in html and "fidelity" in html and 'id="text-rules"' in html
    assert "if pixel[" in html


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["students.max_depth=0"], "students.max_depth"),
        (["students.kinds=[forest]"], "students.kinds"),
        (["students.kinds=[rule_list]"], "separates two classes and the data has 10"),
        (["data.source=diabetes"], "distils classifiers"),
        (["students.kinds=[tree, tree]"], "name each student once"),
    ],
)
def test_bad_input_is_one_line(overrides: list[str], fragment: str, tmp_path: Path) -> None:
    result = stillroom_in_process(
        "distill", DIGITS, *DIGITS_TINY, *TINY, *overrides, "--out", tmp_path / "r", "--no-progress"
    )
    assert_user_error(result, fragment)
    assert not (tmp_path / "r" / "teacher").exists()  # refused before anything trained
