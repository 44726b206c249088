"""The `data:` section of a recipe: which source, which file or folder, which columns, which splits.

It is validated at load (one line naming the field) and is what the data layer reads: there is no
second, mirrored options object. `source` names a row of `stillroom.data.sources.DATASETS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stillroom.data.augment import AugmentSection
from stillroom.data.sources import DATASETS, FILE_SOURCES

SourceName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]  # the table is the one list


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: SourceName = Field(
        "digits",
        description="a built-in dataset, or your own: csv, json, parquet, hf_disk (a folder "
        "written by datasets' save_to_disk), images (class subfolders of image files), npz",
    )
    path: Path | None = Field(
        None, description="your data: the file or folder (the training data when val/test given)"
    )
    val_path: Path | None = Field(
        None, description="your own validation file/folder (else val_fraction of path is held out)"
    )
    test_path: Path | None = Field(
        None, description="your own test file/folder (else test_fraction of path is held out)"
    )
    label: str = Field("label", description="tables: the column holding the label or target")
    inputs: list[str] | None = Field(
        None, description="tables: the input columns (default: every column but the label)"
    )
    task: Literal["classification", "regression"] | None = Field(
        None,
        description="tables: default from the label column (integer/text: classification, "
        "float: regression)",
    )
    split: str | None = Field(
        None, description="hf_disk: which split of a saved DatasetDict (default train)"
    )
    image_size: tuple[int, int] | None = Field(
        None, description="images: resize every image to [height, width] (default: as stored)"
    )
    image_mode: Literal["L", "RGB"] | None = Field(
        None, description="images: grayscale or colour (default: L when every image is gray)"
    )
    standardize: bool | None = Field(
        None,
        description="standardise numeric input features with the training split's mean and std "
        "(saved with every model); default: on for tables and 2-D npz inputs, off for images",
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share held out for the final table")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share used for early stopping / best checkpoint"
    )
    label_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of training samples whose labels the student sees; the teacher gives soft "
        "targets for all of them (the few-labels + unlabeled transfer set setting)",
    )
    batch_size: int = Field(64, ge=1)
    augment: AugmentSection = Field(
        AugmentSection(),
        description="training-time augmentation of every training batch (shifts, flips, noise, "
        "input dropout), seeded per batch; the teacher then runs live on the augmented inputs",
    )
    memory_limit_mb: float = Field(
        2048,
        ge=0,
        description="data larger than this (inputs as float32, or a table's files) is not loaded "
        "whole: it is read a batch at a time from disk (an uncompressed .npz in place; images and "
        "tables decoded once into a scratch file)",
    )
    scratch_dir: Path | None = Field(
        None,
        description="where decoded data over memory_limit_mb is kept while the run lasts, as a "
        "file with no name that is gone when the run ends (default: the system's temporary folder)",
    )

    @model_validator(mode="after")
    def _paths_fit_the_source(self) -> DataSection:
        if self.source in FILE_SOURCES and self.path is None:
            raise ValueError(f"data.source '{self.source}' needs data.path: your file or folder")
        if self.source not in FILE_SOURCES and (self.path or self.val_path or self.test_path):
            raise ValueError(
                f"data.source '{self.source}' is built in and reads no path; to use your own data "
                f"pick one of {', '.join(FILE_SOURCES)}"
            )
        return self
