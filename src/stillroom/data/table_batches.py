"""Tables larger than memory, read in record batches: never a whole table in memory.

Two passes over the file. The first fits the `TableEncoding` (input columns, categories, classes,
image size and mode) batch by batch, exactly as `read_table` fits it on a whole table: the same
categories in the same order, so a run reads the same features however its data is read. The
second encodes each batch with that encoding into a scratch file (`stillroom.data.mapped`), from
which training and evaluation read a batch at a time; only the targets (one number a row) are
kept in memory.

CSV is streamed by pyarrow (types inferred from the first block: a column that changes type
further down is reported with the rows it was in), Parquet by row groups, `save_to_disk` folders
and JSON through `datasets`' memory-mapped Arrow files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from stillroom.data.builtin import ArrayData
from stillroom.data.mapped import MappedInputs, scratch_array
from stillroom.errors import StillroomError

BATCH_ROWS = 65_536
"""Rows of a Parquet file or saved dataset encoded at a time."""
CSV_BLOCK_BYTES = 16 << 20
"""Bytes of a CSV file parsed at a time (pyarrow's block)."""


def read_table_batches(
    path: Path,
    fmt: str,
    *,
    label: str,
    inputs: list[str] | None,
    task: str | None,
    split: str | None,
    encoding: Any | None,
    image_size: tuple[int, int] | None,
    image_mode: str | None,
    workdir: Path | None,
) -> tuple[ArrayData, Any]:
    """`read_table` for a file too large for memory: the same encoding and targets, the inputs
    mapped from a scratch file."""
    from stillroom.data import tables

    with ExitStack() as stack:
        batches, class_names, image_columns = _batches(path, fmt, split, stack)
        first = next(batches(), None)
        if first is None or first.num_rows == 0:
            raise StillroomError(f"{path} has no rows; give a table with at least one")
        if encoding is None:
            columns = tables._input_columns(first, label, inputs, path)
            image = len(columns) == 1 and columns[0] in image_columns
            encoding = _fit(
                batches, path, label, columns, task, class_names, image, image_size, image_mode
            )
        rows = sum(batch.num_rows for batch in batches())
        image = encoding.image is not None
        if image:
            channels = 1 if encoding.image["mode"] == "L" else 3
            shape: tuple[int, ...] = (rows, channels, *encoding.image["size"])
        else:
            shape = (rows, len(encoding.feature_names))
        x = scratch_array(shape, workdir)
        targets, start = [], 0
        for batch in batches():
            try:
                block, target = _encode(batch, encoding, class_names, path)
            except StillroomError as err:
                raise StillroomError(f"{err} (counting from row {start + 1} of the file)") from err
            x[start : start + batch.num_rows] = block
            targets.append(target)
            start += batch.num_rows
    num_outputs = len(encoding.classes) if encoding.classes is not None else 1
    name = path.name if fmt == "hf_disk" else path.stem
    data = ArrayData(MappedInputs(x), torch.cat(targets), encoding.task, num_outputs, name)
    return data, encoding


def _batches(
    path: Path, fmt: str, split: str | None, stack: ExitStack
) -> tuple[Callable[[], Iterator[pa.Table]], dict[str, list[str]], set[str]]:
    """A function giving a fresh iterator over the file's batches, the ClassLabel names and the
    image columns (from the saved `datasets` features, when there are any)."""
    import datasets
    import pyarrow.csv
    import pyarrow.parquet

    from stillroom.data import tables

    try:
        stack.enter_context(tables._quiet())
        if fmt == "csv":
            parse = pyarrow.csv.ParseOptions(newlines_in_values=True)
            convert = pyarrow.csv.ConvertOptions(strings_can_be_null=True)
            read = pyarrow.csv.ReadOptions(block_size=CSV_BLOCK_BYTES)

            def from_csv() -> Iterator[pa.Table]:
                with pyarrow.csv.open_csv(path, read, parse, convert) as reader:
                    for batch in _guarded(reader, path):
                        yield pa.Table.from_batches([batch])

            return from_csv, {}, set()
        if fmt == "parquet":
            file = pyarrow.parquet.ParquetFile(path)
            features = datasets.Features.from_arrow_schema(file.schema_arrow)

            def from_parquet() -> Iterator[pa.Table]:
                for batch in _guarded(file.iter_batches(BATCH_ROWS), path):
                    yield pa.Table.from_batches([batch])

            return from_parquet, *_feature_kinds(features)
        if fmt == "json":
            cache = stack.enter_context(tempfile.TemporaryDirectory())
            ds = datasets.Dataset.from_json(str(path), cache_dir=cache)  # Arrow on disk, mapped
        else:
            ds = tables._pick_split(datasets.load_from_disk(str(path)), path, split)
    except (pa.ArrowInvalid, OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise StillroomError(
            f"cannot read {path} as {fmt} ({err.__cause__ or err}); check the file or data.format"
        ) from err
    arrow = ds.with_format("arrow")

    def from_dataset() -> Iterator[pa.Table]:
        yield from arrow.iter(BATCH_ROWS)

    return from_dataset, *_feature_kinds(ds.features)


def _guarded(reader: Any, path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from reader
    except (pa.ArrowInvalid, OSError) as err:
        raise StillroomError(
            f"cannot read {path} in batches ({err}); a column whose values change type further "
            "down the file must be cleaned, or raise data.memory_limit_mb to read it whole"
        ) from err


def _feature_kinds(features: Any) -> tuple[dict[str, list[str]], set[str]]:
    import datasets

    names = {k: f.names for k, f in features.items() if isinstance(f, datasets.ClassLabel)}
    images = {k for k, f in features.items() if isinstance(f, datasets.Image)}
    return names, images


def _fit(
    batches: Callable[[], Iterator[pa.Table]],
    path: Path,
    label: str,
    columns: list[str],
    task: str | None,
    class_names: dict[str, list[str]],
    image: bool,
    image_size: tuple[int, int] | None,
    image_mode: str | None,
) -> Any:
    """The encoding `read_table` would fit on the whole file, fitted a batch at a time."""
    from stillroom.data import images, tables

    seen: dict[str, set[str]] = {}
    categorical: set[str] = set()
    classes: set[str] = set()
    modes, sizes = set(), set()
    for batch in batches():
        arrays = {
            name: tables._plain(tables._column(batch, name, path), name, path) for name in columns
        }
        if image:
            for item in arrays[columns[0]].to_pylist():
                mode, size = images._header(item, f"{path.name} image")
                modes.add(mode)
                sizes.add(size)
        else:
            _, fitted = tables._encode_inputs(arrays, class_names, None, path)
            for name, known in fitted["categories"].items():
                categorical.add(name)
                seen.setdefault(name, set()).update(known)
        target = tables._plain(tables._column(batch, label, path), label, path)
        if task is None:  # as read_table decides it, from the label column's type
            task = "regression" if pa.types.is_floating(target.type) else "classification"
        if task == "regression":
            tables._numbers(target, label, path, label=True)
        else:
            _, texts = tables._distinct(target, class_names.get(label), label, path, label=True)
            classes.update(t for t in texts if t is not None)
    categories = {
        name: list(class_names[name]) if name in class_names else sorted(seen[name])
        for name in columns
        if name in categorical
    }
    for name, known in categories.items():
        if len(known) > tables.MAX_CATEGORIES:
            raise StillroomError(
                f"column {name!r} in {path.name} has {len(known)} distinct values, too many to "
                f"one-hot (at most {tables.MAX_CATEGORIES}); leave it out of data.inputs"
            )
    feature_names, numeric = [], []
    for name in columns:
        if image:
            break
        if name in categories:
            feature_names += [f"{name}={value}" for value in categories[name]]
            numeric += [False] * len(categories[name])
        else:
            feature_names.append(name)
            numeric.append(True)
    encoded_image = None
    if image:
        mode = image_mode or ("L" if modes <= images._GRAY_MODES else "RGB")
        if image_size is None and len(sizes) > 1:
            raise StillroomError(
                f"images in {path.name} differ in size ({len(sizes)} sizes); set "
                "data.image_size: [H, W] to resize them all"
            )
        width, height = next(iter(sizes))
        encoded_image = {"size": list(image_size or (height, width)), "mode": mode}
    if task == "regression":
        class_list = None
    elif label in class_names:
        class_list = list(class_names[label])
    elif all(tables._is_number(t) for t in classes):
        class_list = sorted(classes, key=float)
    else:
        class_list = sorted(classes)
    if class_list is not None and not class_list:
        raise StillroomError(f"label column {label!r} in {path.name} is empty; fill in labels")
    return tables.TableEncoding(
        columns, label, task, categories, class_list, feature_names, numeric, encoded_image
    )


def _encode(
    batch: pa.Table, encoding: Any, class_names: dict[str, list[str]], path: Path
) -> tuple[np.ndarray, torch.Tensor]:
    from stillroom.data import tables

    columns = encoding.input_columns
    arrays = {
        name: tables._plain(tables._column(batch, name, path), name, path) for name in columns
    }
    if encoding.image is not None:
        x, _ = tables._encode_image(arrays[columns[0]], encoding, None, None, path)
    else:
        x, _ = tables._encode_inputs(arrays, class_names, encoding, path)
    targets, _, _ = tables._encode_label(
        batch, encoding.label_column, None, encoding, class_names, path
    )
    return np.asarray(x), targets
