"""User tables (CSV, JSON / JSON lines, Parquet, folders written by `datasets`' `save_to_disk`) as
float matrices for tabular teachers and students.

Numeric columns become one feature each; text and bool columns one-hot features. The `TableEncoding`
fitted on the training table is saved in the run folder and given back for val/test files and
inference, so every file is encoded the same way. An image column of a saved `datasets` folder, as
the only input, is decoded like an image folder. Rows in messages count from 1 (a header is no row).

CSV and Parquet are read with pyarrow (its CSV reader keeps an integer column with blanks as
integers, where pandas would make floats of them and so a regression target of an integer label),
JSON with `datasets` into a temporary cache: nothing is written to the user's Hugging Face cache.
"""

from __future__ import annotations

import difflib
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from stillroom.data.builtin import ArrayData
from stillroom.data.images import decode_images
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

TABLE_FORMATS = ("csv", "json", "parquet", "hf_disk")
TASKS = ("classification", "regression")
SUFFIXES = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File suffix -> format when data.format is not set (a folder is "hf_disk")."""
MAX_CATEGORIES = 1000
"""More distinct values than this in a text column make an identifier or free text, not a category."""


@dataclass(frozen=True)
class TableEncoding:
    """How a table's columns became a float matrix; JSON-able, saved in the run folder so val/test
    files and later inference encode the same way.

    categories: categorical (text/bool) input column -> its categories, one-hot in this order.
    classes: label values as text in class-id order (None for regression).
    feature_names / numeric: one per encoded feature ("col" numeric, "col=value" one-hot); numeric
    features are the ones to standardise.
    image: {"size": [H, W], "mode"} when the only input is an image column; feature_names and
    numeric are then empty, as the inputs are (N, C, H, W) pixels.
    """

    input_columns: list[str]
    label_column: str
    task: str
    categories: dict[str, list[str]]
    classes: list[str] | None
    feature_names: list[str]
    numeric: list[bool]
    image: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableEncoding:
        return cls(**data)


def read_table(
    path: Path,
    *,
    label: str,
    inputs: list[str] | None = None,
    task: str | None = None,
    format: str | None = None,
    split: str | None = None,
    encoding: TableEncoding | None = None,
    image_size: tuple[int, int] | None = None,
    image_mode: str | None = None,
    memory_limit_mb: float | None = None,
    workdir: Path | None = None,
) -> tuple[ArrayData, TableEncoding]:
    """Read a table and encode it: inputs (N, F) float32 (or (N, C, H, W) for an image column),
    targets (N,) int64 class ids (IGNORE_INDEX where the label is missing) or float32 (NaN).

    inputs None: every column but the label. task None: classification for an integer, text, bool
    or ClassLabel label, regression for a float one. split picks a DatasetDict's split ("train" by
    default). encoding (the training table's) is reused exactly, and a file without the label
    column then reads as unlabelled. image_size (H, W) / image_mode: as for an image folder.
    A file (or saved folder) larger than `memory_limit_mb` is read in record batches, its inputs
    kept in a scratch file in `workdir` (`stillroom.data.table_batches`).
    """
    path = Path(path)
    fmt = _format(path, format)
    if task is not None and task not in TASKS:
        raise StillroomError(f"unknown task {task!r}; use {' or '.join(TASKS)}")
    if split is not None and fmt != "hf_disk":
        raise StillroomError(f"data.split {split!r} applies only to a DatasetDict folder; drop it")
    if encoding is not None:
        given, saved = (
            (label, inputs, task),
            (encoding.label_column, encoding.input_columns, encoding.task),
        )
        if any(g is not None and g != s for g, s in zip(given, saved, strict=True)):
            raise StillroomError(
                f"label, inputs, task {list(given)} differ from the training table's {list(saved)}; "
                "every file of a run is read the same way"
            )
    if memory_limit_mb is not None and _file_bytes(path) > memory_limit_mb * 2**20:
        from stillroom.data.table_batches import read_table_batches

        return read_table_batches(
            path,
            fmt,
            label=label,
            inputs=inputs,
            task=task,
            split=split,
            encoding=encoding,
            image_size=image_size,
            image_mode=image_mode,
            workdir=workdir,
        )
    table, class_names, image_columns = _load(path, fmt, split)
    if table.num_rows == 0:
        raise StillroomError(f"{path} has no rows; give a table with at least one")
    if encoding is None:
        columns = _input_columns(table, label, inputs, path)
    else:
        columns = encoding.input_columns
    arrays = {name: _plain(_column(table, name, path), name, path) for name in columns}
    if len(columns) == 1 and columns[0] in image_columns:
        x, fitted = _encode_image(arrays[columns[0]], encoding, image_size, image_mode, path)
    else:
        x, fitted = _encode_inputs(arrays, class_names, encoding, path)
    targets, task, classes = _encode_label(table, label, task, encoding, class_names, path)
    encoding = encoding or TableEncoding(columns, label, task, classes=classes, **fitted)
    num_outputs = len(classes) if classes is not None else 1
    name = path.name if fmt == "hf_disk" else path.stem
    return ArrayData(x, targets, task, num_outputs, name), encoding


def _file_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file in a saved folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _format(path: Path, format: str | None) -> str:
    if format is not None and format not in TABLE_FORMATS:
        raise StillroomError(
            f"unknown data.format {format!r}; use one of {', '.join(TABLE_FORMATS)}"
        )
    if not path.exists():
        raise StillroomError(f"data file {path} does not exist; check data.path")
    if format is None and not path.is_dir() and path.suffix.lower() not in SUFFIXES:
        raise StillroomError(
            f"cannot tell the format of {path} from its suffix; name it {'/'.join(SUFFIXES)} or "
            f"set data.format ({', '.join(TABLE_FORMATS)})"
        )
    format = format or ("hf_disk" if path.is_dir() else SUFFIXES[path.suffix.lower()])
    if (format == "hf_disk") != path.is_dir():
        raise StillroomError(f"data.format {format!r} does not fit {path}: hf_disk is for folders")
    return format


@contextmanager
def _quiet() -> Iterator[None]:
    """No `datasets` progress bars or logged errors while reading (a bad file becomes one
    StillroomError line); both restored afterwards."""
    import datasets

    bars_off, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _load(
    path: Path, fmt: str, split: str | None
) -> tuple[pa.Table, dict[str, list[str]], set[str]]:
    """The table, the names of its ClassLabel columns, and its image columns."""
    import datasets
    import pyarrow.csv
    import pyarrow.parquet

    if split is not None and fmt != "hf_disk":
        raise StillroomError(f"data.split {split!r} applies only to a DatasetDict folder; drop it")
    if fmt == "json" and path.stat().st_size == 0:
        raise StillroomError(f"{path} has no rows; give a table with at least one")
    if fmt == "hf_disk" and not any(
        (path / f).is_file() for f in ("state.json", "dataset_dict.json")
    ):
        raise StillroomError(
            f"{path} is a folder but not one written by datasets' save_to_disk (no state.json or "
            "dataset_dict.json); give a .csv/.json/.parquet file or a saved dataset"
        )
    try:
        with _quiet():
            if fmt == "csv":
                options = pyarrow.csv.ConvertOptions(strings_can_be_null=True)
                # a quoted value may hold line breaks (a text column: paragraphs of an article);
                # without this pyarrow cuts its blocks inside them once a file passes 1 MB
                parse = pyarrow.csv.ParseOptions(newlines_in_values=True)
                table = pyarrow.csv.read_csv(path, parse_options=parse, convert_options=options)
                ds = datasets.Dataset(table)
            elif fmt == "parquet":
                # Dataset(table) picks up the ClassLabel / Image features `datasets` saves in the schema
                ds = datasets.Dataset(pyarrow.parquet.read_table(path))
            elif fmt == "json":
                with tempfile.TemporaryDirectory() as cache:
                    ds = datasets.Dataset.from_json(str(path), keep_in_memory=True, cache_dir=cache)
            else:
                ds = _pick_split(datasets.load_from_disk(str(path)), path, split)
    except (pa.ArrowInvalid, OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise StillroomError(
            f"cannot read {path} as {fmt} ({err.__cause__ or err}); check the file or data.format"
        ) from err
    class_names = {k: f.names for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    images = {k for k, f in ds.features.items() if isinstance(f, datasets.Image)}
    # an Arrow table of exactly the dataset's rows (save_to_disk flattens a selection)
    return ds.with_format("arrow")[:], class_names, images


def _pick_split(loaded: Any, path: Path, split: str | None) -> datasets.Dataset:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise StillroomError(
                f"data.split {split!r} given, but {path} holds one Dataset; drop it"
            )
        return loaded
    if split is None and "train" not in loaded and len(loaded) > 1:
        raise StillroomError(
            f"{path} has splits {', '.join(loaded)} but no 'train'; set data.split"
        )
    split = split or ("train" if "train" in loaded else next(iter(loaded)))
    if split not in loaded:
        raise StillroomError(f"{path} has no split {split!r}; available: {', '.join(loaded)}")
    return loaded[split]


def _column(table: pa.Table, name: str, path: Path) -> pa.ChunkedArray:
    if name not in table.column_names:
        close = difflib.get_close_matches(name, table.column_names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StillroomError(
            f"{path.name} has no column {name!r}{hint}; its columns: {', '.join(table.column_names)}"
        )
    return table.column(name)


def _input_columns(table: pa.Table, label: str, inputs: list[str] | None, path: Path) -> list[str]:
    _column(table, label, path)
    if inputs is None:
        inputs = [name for name in table.column_names if name != label]
        if not inputs:
            raise StillroomError(f"{path.name} has only the label column {label!r}; add inputs")
    elif not inputs:
        raise StillroomError("data.inputs is empty; name the input columns or leave it unset")
    elif label in inputs:
        raise StillroomError(f"label column {label!r} is also in data.inputs; remove it there")
    elif len(set(inputs)) != len(inputs):
        raise StillroomError(f"data.inputs names a column twice ({inputs}); list each once")
    return list(inputs)


def _is_numeric(array: pa.Array) -> bool:
    kind = array.type  # null: a column with no values at all, reported as missing
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)


def _is_categorical(array: pa.Array) -> bool:
    kind = array.type
    return pa.types.is_boolean(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _plain(column: pa.ChunkedArray, name: str, path: Path) -> pa.Array:
    """One contiguous array of numbers, text, bools or image structs (dictionaries decoded, decimals
    as floats, a JSON field of mixed scalars as text)."""
    array = column.combine_chunks()
    if pa.types.is_dictionary(array.type):
        return array.dictionary_decode()
    if pa.types.is_decimal(array.type):
        return array.cast(pa.float64())
    if isinstance(array.type, pa.BaseExtensionType) and array.type.extension_name == "arrow.json":
        # `datasets` reads a JSON field holding numbers in some rows and text in others this way
        values = [None if v is None else json.loads(v) for v in array.storage.to_pylist()]
        if any(isinstance(v, dict | list) for v in values):
            raise StillroomError(
                f"column {name!r} in {path.name} holds nested JSON values; flatten it to numbers "
                "or text, or leave it out of data.inputs"
            )
        return pa.array([_text(v) for v in values], pa.string())
    return array


def _text(value: Any) -> str | None:
    """A value as category / class text; None when missing (null, NaN, empty text)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 1.0 in a test file is the class "1" of an integer column
    return str(value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _missing(name: str, path: Path, row: int, what: str = "a missing value") -> StillroomError:
    return StillroomError(
        f"column {name!r} in {path.name} has {what} in row {row + 1}; fill it in or drop the row"
    )


def _numbers(array: pa.Array, name: str, path: Path, *, label: bool = False) -> np.ndarray:
    """(N,) float32; NaN where missing for a label, an error for an input."""
    if not _is_numeric(array):
        example = next((v for v in array.to_pylist() if v is not None), None)
        raise StillroomError(
            f"column {name!r} in {path.name} holds {array.type} values ({example!r}) where numbers "
            f"are needed; {'set data.task: classification' if label else 'clean the column'} or "
            "check that the training table had the same column"
        )
    values = array.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32)
    bad = np.isinf(values) if label else ~np.isfinite(values)
    if bad.any():
        raise _missing(name, path, int(np.flatnonzero(bad)[0]), "a missing or infinite value")
    return values


def _distinct(
    array: pa.Array, names: list[str] | None, column: str, path: Path, *, label: bool = False
) -> tuple[np.ndarray, list[str | None]]:
    """(N,) int64 index of each row's value into the distinct values (-1 where missing), and those
    values as text. A ClassLabel column (names given) indexes its names."""
    if names is not None:
        ids = array.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.where(ids >= 0, ids, -1), list(names)
    encoded = array.dictionary_encode()
    rows = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    texts = [_text(v) for v in encoded.dictionary.to_pylist()]
    rows[np.isin(rows, [i for i, t in enumerate(texts) if t is None])] = -1
    counts = np.bincount(rows[rows >= 0], minlength=len(texts))
    numbers = np.array([t is not None and _is_number(t) for t in texts], dtype=bool)
    if counts[numbers].sum() > counts[~numbers].sum() > 0:
        first = int(np.flatnonzero((rows >= 0) & ~numbers[np.maximum(rows, 0)])[0])
        raise StillroomError(
            f"column {column!r} in {path.name} mixes numbers and text (row {first + 1}: "
            f"{texts[rows[first]]!r}); clean the column"
            + ("" if label else ", or leave it out of data.inputs")
        )
    return rows, texts


def _lookup(
    rows: np.ndarray, texts: list[str | None], known: list[str], what: str, name: str, path: Path
) -> np.ndarray:
    """(N,) int64 position of each row's value in `known` (-1 where missing)."""
    index = {value: i for i, value in enumerate(known)}
    for i, t in enumerate(texts):
        if t is not None and t not in index and (rows == i).any():
            shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
            raise StillroomError(
                f"{what} {t!r} of column {name!r} in {path.name} (row {np.flatnonzero(rows == i)[0] + 1}) "
                f"is not in the training table ({shown}); drop those rows or add it to the training data"
            )
    position = np.array([index.get(t, -1) for t in texts] + [-1], dtype=np.int64)
    return position[rows]  # rows == -1 picks the trailing -1


def _encode_image(
    array: pa.Array,
    encoding: TableEncoding | None,
    size: tuple[int, int] | None,
    mode: str | None,
    path: Path,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N, C, H, W) pixels of an image column, decoded like an image folder."""
    saved = (encoding.image if encoding is not None else None) or {}
    pixels = decode_images(
        array.to_pylist(),
        size or (tuple(saved["size"]) if saved else None),
        mode or saved.get("mode"),
        names=[f"{path.name} row {i + 1}" for i in range(len(array))],
    )
    image = {"size": list(pixels.shape[2:]), "mode": "L" if pixels.shape[1] == 1 else "RGB"}
    return pixels, {"categories": {}, "feature_names": [], "numeric": [], "image": image}


def _encode_inputs(
    arrays: dict[str, pa.Array],
    class_names: dict[str, list[str]],
    encoding: TableEncoding | None,
    path: Path,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N, F) float32 inputs, and the categories, feature names and numeric flags."""
    blocks, categories, feature_names, numeric = [], {}, [], []
    for name, array in arrays.items():
        if encoding is not None:
            categorical = name in encoding.categories
        elif _is_numeric(array) or _is_categorical(array) or name in class_names:
            categorical = not _is_numeric(array) or name in class_names
        else:
            raise StillroomError(
                f"column {name!r} in {path.name} holds {array.type} values, which cannot be "
                "encoded; convert it to numbers or text, or leave it out of data.inputs"
            )
        if not categorical:
            blocks.append(_numbers(array, name, path)[:, None])
            feature_names.append(name)
            numeric.append(True)
            continue
        rows, texts = _distinct(array, class_names.get(name), name, path)
        if encoding is not None:
            known = encoding.categories[name]
        else:
            known = texts if name in class_names else sorted({t for t in texts if t is not None})
        if len(known) > MAX_CATEGORIES:
            raise StillroomError(
                f"column {name!r} in {path.name} has {len(known)} distinct values, too many to "
                f"one-hot (at most {MAX_CATEGORIES}); leave it out of data.inputs"
            )
        codes = _lookup(rows, texts, known, "value", name, path)
        if (codes < 0).any():
            raise _missing(name, path, int(np.flatnonzero(codes < 0)[0]))
        block = np.zeros((len(codes), len(known)), dtype=np.float32)
        block[np.arange(len(codes)), codes] = 1.0
        blocks.append(block)
        categories[name] = list(known)
        feature_names += [f"{name}={value}" for value in known]
        numeric += [False] * len(known)
    fitted = {"categories": categories, "feature_names": feature_names, "numeric": numeric}
    return torch.from_numpy(np.concatenate(blocks, axis=1)), fitted


def _encode_label(
    table: pa.Table,
    label: str,
    task: str | None,
    encoding: TableEncoding | None,
    class_names: dict[str, list[str]],
    path: Path,
) -> tuple[torch.Tensor, str, list[str] | None]:
    """(N,) targets (int64 ids, IGNORE_INDEX where missing; or float32, NaN), task and classes."""
    if encoding is not None and label not in table.column_names:
        # an inference file: every row unlabelled (the teacher still soft-labels it)
        unlabelled = IGNORE_INDEX if encoding.task == "classification" else float("nan")
        return torch.full((table.num_rows,), unlabelled), encoding.task, encoding.classes
    array = _plain(_column(table, label, path), label, path)
    if encoding is not None:
        task = encoding.task
    elif task is None:
        task = "regression" if pa.types.is_floating(array.type) else "classification"
    if task == "regression":
        return torch.from_numpy(_numbers(array, label, path, label=True)), task, None
    rows, texts = _distinct(array, class_names.get(label), label, path, label=True)
    classes = encoding.classes if encoding is not None else None
    if classes is None:
        present = {t for t in texts if t is not None}
        if label in class_names:
            classes = list(texts)
        elif all(_is_number(t) for t in present):
            classes = sorted(present, key=float)
        else:
            classes = sorted(present)
        if not classes:
            raise StillroomError(f"label column {label!r} in {path.name} is empty; fill in labels")
    ids = _lookup(rows, texts, classes, "class", label, path)
    return torch.from_numpy(np.where(ids >= 0, ids, IGNORE_INDEX)), task, list(classes)
