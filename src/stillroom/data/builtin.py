"""Datasets as in-memory tensors (`ArrayData`), their splits, and the few-label setting.

Readers of the built-ins: `digits` (scikit-learn's 1,797 8x8 handwritten digits, embedded in the
package) is the default classification task; `diabetes` (442 patients, 10 features) the built-in
regression task; `read_npz` reads a user's `.npz` file with arrays `inputs` (N, ...) and `targets`
(N,) (integer targets mean classification, float targets regression). The table of every source
is `stillroom.data.sources.DATASETS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stillroom.data.mapped import MappedInputs, npz_member
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX


@dataclass(frozen=True)
class ArrayData:
    """A dataset: its inputs in memory, or on disk read a batch at a time (`MappedInputs`).

    inputs: (N, *input_shape) float32 (a tensor, or mapped rows that index like one). targets: (N,) int64 class ids (IGNORE_INDEX = no label) for
    classification; (N,) or (N, D) float32 (NaN = no label) for regression.
    """

    inputs: torch.Tensor | MappedInputs
    targets: torch.Tensor
    task: str
    num_outputs: int
    name: str
    preprocess: dict[str, Any] | None = None
    """How inputs and targets were rescaled from the user's units (`stillroom.data.scaling`);
    saved with every model trained on them. None: they are as read."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def mapped(self) -> bool:
        """True when the inputs stay on disk and are read a batch at a time."""
        return isinstance(self.inputs, MappedInputs)

    def subset(self, index: torch.Tensor) -> ArrayData:
        inputs = self.inputs.take(index) if self.mapped else self.inputs[index]  # type: ignore[union-attr]
        return replace(self, inputs=inputs, targets=self.targets[index])

    def head(self, n: int) -> ArrayData:
        """The first `n` samples, in memory (for checks that need a few real inputs)."""
        return replace(self, inputs=self.inputs[:n], targets=self.targets[:n])


@dataclass(frozen=True)
class Splits:
    train: ArrayData
    val: ArrayData
    test: ArrayData
    record: dict[str, Any] | None = None
    """How they were read and rescaled (source, columns, encodings, sizes): the run's data.json."""


def read_digits() -> ArrayData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are 0..16; scale to [0, 1] and keep the image shape for convolutional teachers
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return ArrayData(
        images, torch.tensor(bunch.target, dtype=torch.int64), "classification", 10, "digits"
    )


def read_diabetes() -> ArrayData:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    return ArrayData(
        torch.tensor(bunch.data, dtype=torch.float32),
        torch.tensor(bunch.target, dtype=torch.float32),
        "regression",
        1,
        "diabetes",
    )


def read_npz(path: Path, memory_limit_mb: float | None = None) -> ArrayData:
    """An .npz with arrays `inputs` (N, ...) and `targets` (N,) or (N, D). Inputs larger than
    `memory_limit_mb` (as float32) stay on disk, mapped in place and read a batch at a time; that
    needs the file written uncompressed (np.savez, not np.savez_compressed)."""
    path = Path(path)
    if not path.is_file():
        raise StillroomError(f"data file {path} does not exist; check data.path")
    try:
        # allow_pickle=False: an .npz from elsewhere must not run code when loaded
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"inputs", "targets"} - set(arrays.files)
            if missing:
                raise StillroomError(
                    f"{path} lacks array(s) {sorted(missing)}; it holds {arrays.files}. Save it with "
                    "np.savez(path, inputs=X, targets=y)"
                )
            targets = arrays["targets"]
            shape = _member_shape(arrays, "inputs")
            mapped = memory_limit_mb is not None and np.prod(shape) * 4 > memory_limit_mb * 2**20
            if mapped:
                inputs = npz_member(path, "inputs")
                if inputs is None:
                    raise StillroomError(
                        f"{path}: its inputs ({np.prod(shape) * 4 / 2**30:.1f} GiB as float32) are "
                        f"over data.memory_limit_mb={memory_limit_mb:g} and compressed, so they "
                        "cannot be read a batch at a time; save them with np.savez (not "
                        "np.savez_compressed) or raise data.memory_limit_mb"
                    )
            else:
                inputs = arrays["inputs"]
    except (ValueError, OSError, KeyError) as err:
        raise StillroomError(f"cannot read {path} as .npz without pickles ({err})") from err
    if len(inputs) != len(targets):
        raise StillroomError(
            f"{path}: {len(inputs)} inputs but {len(targets)} targets; they must match"
        )
    for name, array in (("inputs", inputs), ("targets", targets)):
        real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if not (real or array.dtype == np.bool_):
            raise StillroomError(
                f"{path}: its {name} are {array.dtype} ({array.dtype.kind!r}); save real numbers "
                "(float32 inputs; int64 class ids or float32 values as targets)"
            )
    if targets.ndim not in (1, 2) or inputs.ndim < 2:
        raise StillroomError(
            f"{path}: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)}; give inputs "
            "(N, features...) and targets (N,) or (N, D)"
        )
    x = MappedInputs(inputs) if mapped else torch.tensor(inputs, dtype=torch.float32)
    if not mapped and not bool(torch.isfinite(x).all()):
        first = int((~torch.isfinite(x.view(len(x), -1))).any(1).nonzero()[0])
        raise StillroomError(
            f"{path}: inputs hold NaN or inf (first in sample {first}); remove or impute them"
        )
    if np.issubdtype(targets.dtype, np.integer):
        num_classes = int(targets.max()) + 1 if len(targets) else 0
        return ArrayData(
            x, torch.tensor(targets, dtype=torch.int64), "classification", num_classes, path.stem
        )
    tgt = torch.tensor(targets, dtype=torch.float32)
    return ArrayData(x, tgt, "regression", 1 if tgt.dim() == 1 else tgt.shape[1], path.stem)


def _member_shape(arrays: Any, name: str) -> tuple[int, ...]:
    """The shape of an .npz member, read from its header alone."""
    with arrays.zip.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(member)[0]
        return np.lib.format.read_array_header_2_0(member)[0]


def split(data: ArrayData, test_fraction: float, val_fraction: float, seed: int) -> Splits:
    """Shuffle with `seed` and cut into train / val / test (each class cut in the same proportions
    when classifying, so rare classes reach every split).

    Nothing is rescaled here: `stillroom.data.scaling.standardize` does that, from the train
    split alone.
    """
    n = len(data)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    # a fraction of 0 cuts nothing (the user gave that split as its own file)
    empty_test, empty_val = test_fraction > 0 and n_test < 1, val_fraction > 0 and n_val < 1
    if n - n_test - n_val < 1 or empty_test or empty_val:
        raise StillroomError(
            f"dataset {data.name!r} has {n} samples: too few for test_fraction={test_fraction} and "
            f"val_fraction={val_fraction}; give more data or change the fractions"
        )
    gen = torch.Generator().manual_seed(seed)
    if data.task == "classification":
        test_idx, val_idx, train_idx = _stratified_cut(
            data.targets, test_fraction, val_fraction, gen
        )
    else:
        order = torch.randperm(n, generator=gen)
        test_idx, val_idx, train_idx = (
            order[:n_test],
            order[n_test : n_test + n_val],
            order[n_test + n_val :],
        )
    return Splits(data.subset(train_idx), data.subset(val_idx), data.subset(test_idx))


def _stratified_cut(
    labels: torch.Tensor, test_fraction: float, val_fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(test, val, train) indices with each class split in the same proportions, each shuffled."""
    parts: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    for cls in labels.unique():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_test, n_val = round(len(members) * test_fraction), round(len(members) * val_fraction)
        for part, chunk in zip(
            parts,
            (members[:n_test], members[n_test : n_test + n_val], members[n_test + n_val :]),
            strict=True,
        ):
            part.append(chunk)
    test, val, train = (torch.cat(p) for p in parts)
    # shuffle across classes: nothing downstream should see the samples grouped by class
    return tuple(p[torch.randperm(len(p), generator=gen)] for p in (test, val, train))


def hide_labels(data: ArrayData, label_fraction: float, seed: int) -> ArrayData:
    """Keep the labels of `label_fraction` of the samples (at least one per class), hide the rest.

    Hidden labels become IGNORE_INDEX (classification) or NaN (regression): the student gets no
    hard-label loss on them, while a teacher still gives soft targets for every input.
    """
    if label_fraction >= 1.0:
        return data
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.zeros(len(data), dtype=torch.bool)
    if data.task == "classification":
        for cls in data.targets.unique():
            members = torch.nonzero(data.targets == cls).flatten()
            n_keep = max(1, round(label_fraction * len(members)))
            keep[members[torch.randperm(len(members), generator=gen)[:n_keep]]] = True
        targets = torch.where(keep, data.targets, torch.full_like(data.targets, IGNORE_INDEX))
    else:
        n_keep = max(1, round(label_fraction * len(data)))
        keep[torch.randperm(len(data), generator=gen)[:n_keep]] = True
        mask = keep.view(-1, *([1] * (data.targets.dim() - 1)))
        targets = torch.where(mask, data.targets, torch.full_like(data.targets, float("nan")))
    return replace(data, targets=targets)


def labelled_only(data: ArrayData) -> ArrayData:
    """The samples that still carry a label (what a student trained without a teacher can use)."""
    if data.task == "classification":
        keep = data.targets != IGNORE_INDEX
    else:
        keep = ~torch.isnan(data.targets.view(len(data), -1)).any(dim=1)
    return data.subset(torch.nonzero(keep).flatten())
