"""Built-in datasets, user arrays, splits, the few-label setting, and indexed loaders."""

from stillroom.data.builtin import (
    DATASETS,
    ArrayData,
    Splits,
    hide_labels,
    labelled_only,
    load_dataset,
    split,
)
from stillroom.data.loaders import IndexedDataset, make_loader

__all__ = [
    "DATASETS",
    "ArrayData",
    "IndexedDataset",
    "Splits",
    "hide_labels",
    "labelled_only",
    "load_dataset",
    "make_loader",
    "split",
]
