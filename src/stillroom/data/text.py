"""A text column (and a label column) of the user's table, for the language-model methods.

    read_text_table("reviews.csv", text="review", label="sentiment")
        -> TextTable(texts=[...], labels=[class id per row], classes=["neg", "pos"])

The same tables the array methods read (CSV, JSON / JSON lines, Parquet, a `datasets`
save_to_disk folder), read by the same readers (`stillroom.data.tables`, through pyarrow and
Hugging Face `datasets`): one row is one document. Labels are classes named as in the table
(ClassLabel names, or the column's values sorted), so a table and its run read the same way.
Rows in messages count from 1 (a header is no row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stillroom.data.tables import (
    TABLE_FORMATS,
    _column,
    _encode_label,
    _format,
    _load,
    _missing,
)
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX

TEXT_TABLE_SOURCES = TABLE_FORMATS
"""The `data.source` names of the LM methods that read a text column of the user's table."""


@dataclass(frozen=True)
class TextColumns:
    """Which columns of a table the LM methods read: `text` (the documents) and `label` (their
    classes; None: unlabelled); `split`: which split of a saved DatasetDict (None: train)."""

    text: str = "text"
    label: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class TextTable:
    """texts: one document per row. labels: a class id per row (None: no label column asked for);
    classes: class names, index = class id."""

    texts: list[str]
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    name: str = ""


def read_text_table(
    path: Path | str,
    *,
    text: str,
    label: str | None = None,
    format: str | None = None,
    split: str | None = None,
) -> TextTable:
    """The `text` column (and the `label` column as classes) of a table; format None: from the
    suffix (a folder: hf_disk). One-line StillroomError for a missing or empty file, a missing
    column, a column that holds no text, and a missing text or label."""
    path = Path(path)
    fmt = _format(path, format)
    if path.is_file() and path.stat().st_size == 0:
        raise StillroomError(f"{path} is empty; give a table with a header and at least one row")
    table, class_names, _ = _load(path, fmt, split)
    if table.num_rows == 0:
        raise StillroomError(f"{path} has no rows; give a table with at least one")
    if label is not None and label == text:
        raise StillroomError(
            f"data.text and data.label both name column {text!r}; the label is another column"
        )
    texts = _texts(table, text, path)
    name = path.name if fmt == "hf_disk" else path.stem
    if label is None:
        return TextTable(texts, name=name)
    targets, _, classes = _encode_label(table, label, "classification", None, class_names, path)
    unlabelled = (targets == IGNORE_INDEX).nonzero().flatten()
    if len(unlabelled):
        raise _missing(label, path, int(unlabelled[0]))
    assert classes is not None  # classification always names its classes
    return TextTable(texts, targets.tolist(), list(classes), name)


def _texts(table: pa.Table, name: str, path: Path) -> list[str]:
    """The column's strings; one line for a column or a row that holds no text."""
    column = _column(table, name, path).combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = column.to_pylist()
    elif (
        isinstance(column.type, pa.BaseExtensionType) and column.type.extension_name == "arrow.json"
    ):
        # `datasets` reads a JSON field holding text in some rows and numbers in others this way
        values = [None if v is None else json.loads(v) for v in column.storage.to_pylist()]
    elif pa.types.is_null(column.type):
        values = [None] * len(column)
    else:
        example = next((v for v in column.to_pylist() if v is not None), None)
        raise StillroomError(
            f"column {name!r} in {path.name} holds {column.type} values ({example!r}), not text; "
            f"set data.text to the column of strings (columns: {', '.join(table.column_names)})"
        )
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _missing(name, path, row, "no text")
        if not isinstance(value, str):
            raise StillroomError(
                f"column {name!r} in {path.name} holds {value!r} in row {row + 1}, not text; "
                "quote it as a string or set data.text to the column of strings"
            )
    return values
