"""Text columns of the user's tables for the language-model methods (stillroom.data.text): read by
the data layer's table readers, turned into the sentence corpora of `encoder` /
`sentence_embedding` and the token blocks of `causal_lm`; one list of source names per table; bad
tables as one-line errors before a run folder exists; tiny end-to-end runs of the own_text_*
recipes through the CLI on tables the tests write."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import get_args

import pytest

pytest.importorskip("transformers")

from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.data.text import TEXT_TABLE_SOURCES, read_text_table
from stillroom.errors import StillroomError
from stillroom.llm.corpus import CORPUS_SOURCES, CorpusSourceName, read_corpus
from stillroom.llm.sentences import SENTENCE_SOURCES, SentenceSourceName, load_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = ROOT / "recipes"
SENTENCES = {
    "sport": [
        "The striker scored twice in the second half.",
        "The home side won the cup final on penalties.",
        "Their coach praised the young goalkeeper after the match.",
        "The champions lost their first game of the season.",
    ],
    "business": [
        "Shares in the bank rose sharply after the results.",
        "Analysts expect interest rates to stay on hold this year.",
        "The retailer reported higher profits for the quarter.",
        "Oil prices fell as demand from factories slowed.",
    ],
}


def articles(count: int, seed: int = 0) -> dict[str, list[str]]:
    """`count` short articles alternating between two topics: columns body (text) and topic."""
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"body": [], "topic": []}
    for i in range(count):
        topic = list(SENTENCES)[i % 2]
        rows["body"].append("\n".join(rng.sample(SENTENCES[topic], 3)))
        rows["topic"].append(topic)
    return rows


def write_table(path: Path, rows: dict[str, list], fmt: str | None = None) -> Path:
    """The rows as a csv / json (lines) / parquet file or a save_to_disk folder (hf_disk)."""
    import datasets

    table = datasets.Dataset.from_dict(rows)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "hf_disk":
        table.save_to_disk(str(path))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "json":
        table.to_json(str(path))
    else:
        table.to_parquet(str(path))
    return path


# --- one list of names per table ------------------------------------------------------------------


def test_every_source_literal_is_its_table() -> None:
    from stillroom.data import DATASETS
    from stillroom.data.multitask import MULTITASK_DATASETS, MultiTaskSourceName
    from stillroom.data.section import DataSection, SourceName
    from stillroom.methods.causal_lm import CorpusSection
    from stillroom.methods.encoder import TextDataSection
    from stillroom.methods.multitask import MultiTaskDataSection
    from stillroom.methods.sentence_embedding import EmbeddingDataSection

    def field(section: type) -> tuple[str, ...]:
        return get_args(section.model_fields["source"].annotation)

    assert get_args(SourceName) == field(DataSection) == tuple(DATASETS)
    assert get_args(SentenceSourceName) == tuple(SENTENCE_SOURCES)
    assert field(TextDataSection) == field(EmbeddingDataSection) == tuple(SENTENCE_SOURCES)
    assert get_args(CorpusSourceName) == field(CorpusSection) == tuple(CORPUS_SOURCES)
    assert get_args(MultiTaskSourceName) == field(MultiTaskDataSection) == tuple(MULTITASK_DATASETS)
    # the tables the LM methods read are the data layer's table formats, under the same names
    assert set(TEXT_TABLE_SOURCES) <= set(SENTENCE_SOURCES) & set(CORPUS_SOURCES) & set(DATASETS)


# --- the reader -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rows.csv", "rows.json", "rows.parquet", "rows_saved"])
def test_every_table_format_reads_the_same_texts_and_classes(tmp_path: Path, name: str) -> None:
    rows = articles(6)
    rows["count"] = list(range(6))  # other columns are left alone
    fmt = "hf_disk" if name.endswith("saved") else None
    path = write_table(tmp_path / name, rows, fmt)
    table = read_text_table(path, text="body", label="topic")
    assert table.texts == rows["body"]  # line breaks inside a quoted CSV value kept
    assert table.classes == ["business", "sport"]
    assert table.labels == [["business", "sport"].index(t) for t in rows["topic"]]
    assert read_text_table(path, text="body").labels is None


def test_a_saved_class_label_column_keeps_its_names_and_split(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "body": datasets.Value("string"),
            "topic": datasets.ClassLabel(names=["sport", "business"]),
        }
    )
    rows = articles(4)
    rows["topic"] = [["sport", "business"].index(t) for t in rows["topic"]]
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows, features),
            "extra": datasets.Dataset.from_dict(
                {"body": ["Only one row here."], "topic": [1]}, features
            ),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    table = read_text_table(tmp_path / "saved", text="body", label="topic")
    assert table.classes == ["sport", "business"] and table.labels == rows["topic"]
    extra = read_text_table(tmp_path / "saved", text="body", label="topic", split="extra")
    assert extra.texts == ["Only one row here."] and extra.labels == [1]


def test_a_table_reads_as_the_same_corpus_as_class_folders(tmp_path: Path) -> None:
    rows = articles(8)
    for i, (body, topic) in enumerate(zip(rows["body"], rows["topic"], strict=True)):
        (tmp_path / "folders" / topic).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folders" / topic / f"{i:02d}.txt").write_text(body)
    # the folder reads class by class, file by file: the table in the same order
    order = sorted(range(8), key=lambda i: (rows["topic"][i], i))
    table = write_table(tmp_path / "rows.csv", {k: [v[i] for i in order] for k, v in rows.items()})
    for unit in ("sentence", "document"):
        folders = load_corpus("file", path=tmp_path / "folders", unit=unit)
        csv = load_corpus("csv", path=table, text="body", label="topic", unit=unit)
        assert csv.sentences == folders.sentences and csv.labels == folders.labels
        assert csv.documents == folders.documents and csv.classes == folders.classes
    blocks = read_corpus("csv", table, text="body")
    assert blocks.documents == [rows["body"][i] for i in order] and not blocks.pairs


def test_a_path_in_data_source_reads_as_source_file(tmp_path: Path) -> None:
    from stillroom.methods.encoder import TextDataSection

    notes = tmp_path / "notes.txt"
    notes.write_text("One short note about the markets today.\n\nAnother about the match.")
    section = TextDataSection.model_validate({"source": str(notes)})
    assert (section.source, section.path) == ("file", notes)
    # what the run folder keeps (every field) loads back the same
    assert TextDataSection.model_validate(section.model_dump(mode="json")) == section
    assert load_corpus(notes).sentences == load_corpus("file", path=notes).sentences


def test_bad_tables_are_one_line_errors(tmp_path: Path) -> None:
    rows = {"body": ["A line of text here.", "And another line."], "n": [1, 2], "y": ["a", "b"]}
    good = write_table(tmp_path / "rows.csv", rows)

    def fails(message: str, path: Path = good, **columns: str | None) -> None:
        with pytest.raises(StillroomError, match=message) as error:
            read_text_table(path, **{"text": "body", **columns})
        assert "\n" not in str(error.value)

    fails(r"has no column 'bdy' \(did you mean 'body'\?\)", text="bdy")
    fails("column 'n' in rows.csv holds int64 values \\(1\\), not text; set data.text", text="n")
    fails("has no column 'label'", label="label")
    fails("data.text and data.label both name column 'body'", label="body")
    (tmp_path / "empty.csv").write_text("")
    fails(
        "empty.csv is empty; give a table with a header and at least one row",
        tmp_path / "empty.csv",
    )
    (tmp_path / "header.csv").write_text("body,y\n")
    fails("header.csv has no rows", tmp_path / "header.csv")
    (tmp_path / "blank.csv").write_text('body,y\n"Some text here.",a\n"  ",b\n')
    fails("column 'body' in blank.csv has no text in row 2; fill it in", tmp_path / "blank.csv")
    (tmp_path / "unlabelled.csv").write_text("body,y\nSome text here.,a\nMore text here.,\n")
    fails(
        "column 'y' in unlabelled.csv has a missing value in row 2",
        tmp_path / "unlabelled.csv",
        label="y",
    )
    (tmp_path / "mixed.jsonl").write_text('{"body": "Some text."}\n{"body": 3}\n')
    fails("column 'body' in mixed.jsonl holds 3 in row 2, not text", tmp_path / "mixed.jsonl")
    fails("does not exist; check data.path", tmp_path / "missing.csv")
    with pytest.raises(
        StillroomError, match=r"data\.label names a column, but data\.source 'file'"
    ):
        load_corpus("file", path=tmp_path / "empty.csv", label="y")


@pytest.mark.parametrize(
    ("method", "data", "message"),
    [
        ("encoder", {"source": "csv"}, "data.source 'csv' needs data.path"),
        ("encoder", {"source": "bbc_news", "label": "y"}, "data.label names a column of a table"),
        ("encoder", {"source": "bbc_news", "path": "x.csv"}, "is built in and reads no path"),
        ("sentence_embedding", {"source": "xls", "path": "x.xls"}, "Input should be 'bbc_news'"),
        ("causal_lm", {"source": "parquet"}, "data.source 'parquet' needs data.path"),
        ("causal_lm", {"source": "sonnets", "text": "body"}, "data.text applies to a table"),
        ("causal_lm", {"source": "sonnets", "plays": ["hamlet"]}, "data.plays picks"),
    ],
)
def test_data_sections_refuse_fields_that_do_not_fit_the_source(
    method: str, data: dict, message: str
) -> None:
    from stillroom.methods import METHODS

    tree = {"method": method, "data": data}
    if method != "causal_lm":
        tree["teacher"] = {"tiny": {}}
    with pytest.raises(ValueError, match=message):
        METHODS[method].schema.model_validate(tree)


# --- the methods, end to end through the CLI ------------------------------------------------------

ENCODER_SMALL = [
    "teacher.tiny={layers: 2, hidden: 16, heads: 2, intermediate: 32, vocab_size: 120, max_positions: 48}",
    "student.keep=[0]",
    "teacher.train={epochs: 12, lr: 0.01}",
    "distill.epochs=1",
    "data.max_length=40",
    "data.batch_size=8",
    "data.throughput_texts=8",
    "data.throughput_repeats=1",
]


def test_encoder_classifies_a_csv_text_column_by_its_label_column(tmp_path: Path) -> None:
    table = write_table(tmp_path / "news.csv", articles(40))
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        RECIPES / "own_text_encoder.yaml",
        *ENCODER_SMALL,
        f"data.path={table}",
        "data.text=body",
        "data.label=topic",
        "--out",
        out,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    rows = payload["models"]
    assert payload["task"] == "classification" and payload["keep"] == [0]
    # 40 rows: 8 test documents, 4 validation, 28 training (split by row, never within one)
    assert (payload["train_texts"], payload["test_texts"]) == (28, 8)
    assert rows["teacher"]["layers"] == 2 and rows["student_kd"]["layers"] == 1
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
    # the two topics share no words: a fine-tuned teacher tells them apart
    assert rows["teacher"]["accuracy"] >= 0.75
    assert (out / "student_kd" / "model.safetensors").is_file()
    from stillroom.llm.hub import load_pretrained

    assert load_pretrained(out / "student_kd", "sequence_classification").config.num_labels == 2
    # --force never deletes the table the run reads
    inside = out / "news.csv"
    inside.write_bytes(table.read_bytes())
    forced = stillroom_in_process(
        "distill", RECIPES / "own_text_encoder.yaml", *ENCODER_SMALL, f"data.path={inside}",
        "data.text=body", "data.label=topic", "--out", out, "--no-progress", "--force",
    )  # fmt: skip
    assert_user_error(forced, f"--force would delete {inside}, which this run reads")
    assert inside.read_bytes() == table.read_bytes()


def test_causal_lm_learns_from_a_text_column(tmp_path: Path) -> None:
    rows = articles(60)
    table = write_table(tmp_path / "news.parquet", rows)
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        RECIPES / "own_text_causal.yaml",
        "data.source=parquet",
        f"data.path={table}",
        "data.text=body",
        "teacher.tiny.vocab_size=96",
        "teacher.tiny.train.epochs=6",
        "distill.epochs=1",
        "data.block_length=16",
        "data.max_tokens=1200",
        "--out",
        out,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    teacher = json.loads((out / "teacher.json").read_text())
    assert teacher["corpus"] == str(table)
    assert teacher["data"]["train"]["blocks"] >= 50  # 1,200 tokens in blocks of 16: 75 in all
    results = json.loads((out / "results.json").read_text())
    for row in results["models"].values():
        assert 1.0 < row["perplexity"] < 96
    # the text was learnt: the teacher beats a uniform guess over the vocabulary by far
    assert results["models"]["teacher"]["perplexity"] < 30


def test_sentence_embedding_probes_the_label_column_of_a_json_table(tmp_path: Path) -> None:
    table = write_table(tmp_path / "news.json", articles(30))
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        RECIPES / "own_text_embedding.yaml",
        "data.source=json",
        f"data.path={table}",
        "data.text=body",
        "data.label=topic",
        "teacher.tiny={layers: 2, hidden: 16, heads: 2, intermediate: 32, vocab_size: 120, max_positions: 32, init_std: 0.3}",
        "student.keep=[1]",
        "distill.epochs=1",
        "eval.throughput_repeats=1",
        "--out",
        out,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    # every row's 3 sentences, split by row: 6 test rows, 3 validation, 21 training
    assert payload["sentences"] == {"train": 63, "val": 9, "test": 18, "probe": 63}
    assert 0.0 <= payload["models"]["student_kd"]["probe_accuracy"] <= 1.0
    assert (out / "student" / "done.json").is_file()


@pytest.mark.parametrize(
    ("recipe", "change", "message"),
    [
        ("own_text_encoder.yaml", ["data.text=count"], "column 'count' in news.csv holds int64"),
        ("own_text_encoder.yaml", ["data.label=null"], "sequence classification needs classes"),
        ("own_text_encoder.yaml", ["data.label=topc"], "did you mean 'topic'"),
        ("own_text_causal.yaml", ["data.text=bdy"], "has no column 'bdy'"),
        ("own_text_embedding.yaml", ["data.source=csv", "data.path=EMPTY"], "is empty"),
    ],
)
def test_bad_tables_exit_2_before_the_run_folder_exists(
    tmp_path: Path, recipe: str, change: list[str], message: str
) -> None:
    rows = {**articles(10), "count": list(range(10))}
    table = write_table(tmp_path / "news.csv", rows)
    (tmp_path / "empty.csv").write_text("")
    overrides = [f"data.path={table}", "data.text=body", "data.label=topic"]
    if recipe == "own_text_causal.yaml":
        overrides = overrides[:2]
    elif recipe == "own_text_embedding.yaml":
        overrides = ["data.source=csv", *overrides]
    overrides += [c.replace("EMPTY", str(tmp_path / "empty.csv")) for c in change]
    out = tmp_path / "run"
    result = stillroom_in_process("distill", RECIPES / recipe, *overrides, "--out", out)
    assert_user_error(result, message)
    assert not out.exists()
