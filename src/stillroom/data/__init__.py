"""The one data layer: sources (DATASETS), splits, standardisation, the few-label setting, loaders."""

from stillroom.data.builtin import (
    ArrayData,
    Splits,
    hide_labels,
    labelled_only,
    split,
)
from stillroom.data.loaders import IndexedDataset, make_loader
from stillroom.data.scaling import standardize, to_user_units
from stillroom.data.section import DataSection
from stillroom.data.sources import (
    DATASETS,
    FILE_SOURCES,
    Loaded,
    load_dataset,
    prepare_splits,
    read_source,
)

__all__ = [
    "DATASETS",
    "FILE_SOURCES",
    "ArrayData",
    "DataSection",
    "IndexedDataset",
    "Loaded",
    "Splits",
    "hide_labels",
    "labelled_only",
    "load_dataset",
    "make_loader",
    "prepare_splits",
    "read_source",
    "split",
    "standardize",
    "to_user_units",
]
