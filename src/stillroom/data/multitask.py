"""Multi-task data: one set of inputs, a dict of per-task targets, labels missing per task.

The built-in `digits` source pairs two tasks on scikit-learn's 1,797 8x8 handwritten digits:

- `digit` (classification, 10 classes): the written digit.
- `slant` (regression, 1 value): how far the handwriting leans, the shear of the strokes
  -mu11 / mu02 from the image's intensity moments (positive: the top leans right). It is the skew
  estimate the classic MNIST deskewing step removes (LeCun et al. 1998, "Gradient-based learning
  applied to document recognition", results on deskewed inputs).

Why this pair: slant is a property of the writer, not of the digit. It varies nearly as much within
a class as between classes (within-class std 0.06-0.13 against an overall std of 0.12), and a
linear model of the pixels predicts it no better than its mean (RMSE 0.96 std on held-out digits),
so the shared trunk must learn features the class alone does not need. Every image has a slant, so
per-task label fractions say which targets a student sees, as in the few-labels setting.

`npz` reads your own arrays: `inputs` (N, ...) and one `target_<task>` array per task, integer
for classification (IGNORE_INDEX = no label), float for regression (NaN = no label).

A loader over `MultiTaskData` yields `(inputs, {task: targets}, index)`; targets lacking a label are
IGNORE_INDEX (classification) or NaN (regression), which the hard-label terms and metrics skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stillroom.data.builtin import ArrayData, _stratified_cut, hide_labels
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX

TASK_KINDS = ("classification", "regression")


@dataclass(frozen=True)
class TaskInfo:
    """A task of the data: its kind and how many outputs its head needs (classes, or values)."""

    kind: str
    num_outputs: int


@dataclass(frozen=True)
class MultiTaskData:
    """inputs: (N, *input_shape) float32. targets: task -> (N,) int64 class ids (IGNORE_INDEX = no
    label) or (N,) / (N, D) float32 values (NaN = no label). tasks: task -> TaskInfo."""

    inputs: torch.Tensor
    targets: dict[str, torch.Tensor]
    tasks: dict[str, TaskInfo]
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def subset(self, index: torch.Tensor) -> MultiTaskData:
        targets = {task: values[index] for task, values in self.targets.items()}
        return replace(self, inputs=self.inputs[index], targets=targets)

    def labelled(self, task: str) -> torch.Tensor:
        """(N,) bool: which samples carry a label for `task`."""
        values = self.targets[task]
        if self.tasks[task].kind == "classification":
            return values != IGNORE_INDEX
        return ~torch.isnan(values.view(len(values), -1)).any(dim=1)

    def label_counts(self) -> dict[str, int]:
        return {task: int(self.labelled(task).sum()) for task in self.tasks}


@dataclass(frozen=True)
class MultiTaskSplits:
    train: MultiTaskData
    val: MultiTaskData
    test: MultiTaskData


def image_slant(images: torch.Tensor) -> torch.Tensor:
    """Handwriting slant of (N, H, W) non-negative images -> (N,): -mu11 / mu02.

    mu are the central intensity moments (x to the right, y down the rows), so the value is minus
    the slope dx/dy of the strokes: 0 upright, > 0 leaning right at the top.
    """
    n, height, width = images.shape
    ys = torch.arange(height, dtype=images.dtype).view(1, height, 1)
    xs = torch.arange(width, dtype=images.dtype).view(1, 1, width)
    mass = images.sum((1, 2)).clamp_min(1e-8)
    cx = (images * xs).sum((1, 2)) / mass
    cy = (images * ys).sum((1, 2)) / mass
    dx, dy = xs - cx.view(n, 1, 1), ys - cy.view(n, 1, 1)
    mu11 = (images * dx * dy).sum((1, 2)) / mass
    mu02 = (images * dy * dy).sum((1, 2)) / mass
    return -mu11 / mu02.clamp_min(1e-8)


def _digits(path: Path | None) -> MultiTaskData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are 0..16; scale to [0, 1] and keep the image shape for convolutional trunks
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    return MultiTaskData(
        images.unsqueeze(1),
        {
            "digit": torch.tensor(bunch.target, dtype=torch.int64),
            "slant": image_slant(images),
        },
        {"digit": TaskInfo("classification", 10), "slant": TaskInfo("regression", 1)},
        "digits",
    )


def _npz(path: Path | None) -> MultiTaskData:
    if path is None:
        raise StillroomError(
            "data.source 'npz' needs data.path: an .npz with 'inputs' and one 'target_<task>' array "
            "per task"
        )
    path = Path(path)
    if not path.is_file():
        raise StillroomError(f"data file {path} does not exist; check data.path")
    try:
        # allow_pickle=False: an .npz from elsewhere must not run code when loaded
        with np.load(path, allow_pickle=False) as arrays:
            names = list(arrays.files)
            task_arrays = {
                n.removeprefix("target_"): arrays[n] for n in names if n.startswith("target_")
            }
            if "inputs" not in names or not task_arrays:
                raise StillroomError(
                    f"{path} holds {names}; a multi-task .npz needs 'inputs' and one "
                    "'target_<task>' array per task: np.savez(path, inputs=X, target_a=y_a, ...)"
                )
            inputs = torch.tensor(arrays["inputs"], dtype=torch.float32)
    except (ValueError, OSError) as err:
        raise StillroomError(f"cannot read {path} as .npz without pickles ({err})") from err
    targets, tasks = {}, {}
    for task, values in task_arrays.items():
        if len(values) != len(inputs):
            raise StillroomError(
                f"{path}: target_{task} has {len(values)} rows but inputs has {len(inputs)}"
            )
        if np.issubdtype(values.dtype, np.integer):
            labels = torch.tensor(values, dtype=torch.int64)
            known = labels[labels != IGNORE_INDEX]
            classes = int(known.max()) + 1 if len(known) else 0
            targets[task], tasks[task] = labels, TaskInfo("classification", classes)
        else:
            floats = torch.tensor(values, dtype=torch.float32)
            width = 1 if floats.dim() == 1 else floats.shape[1]
            targets[task], tasks[task] = floats, TaskInfo("regression", width)
    return MultiTaskData(inputs, targets, tasks, path.stem)


MULTITASK_DATASETS: dict[str, Callable[[Path | None], MultiTaskData]] = {
    "digits": _digits,  # digit (10 classes) + slant (regression)
    "npz": _npz,  # your arrays: inputs + target_<task> per task
}
"""Every multi-task dataset a multitask recipe's `data.source` may name."""

MultiTaskSourceName = Literal[tuple(MULTITASK_DATASETS)]  # type: ignore[valid-type]  # the table is the one list


def load_multitask(source: str, path: Path | None = None) -> MultiTaskData:
    if source not in MULTITASK_DATASETS:
        raise StillroomError(
            f"unknown multi-task data source {source!r}; available: {', '.join(MULTITASK_DATASETS)}"
        )
    data = MULTITASK_DATASETS[source](path)
    if len(data) == 0:
        raise StillroomError(f"dataset {data.name!r} has no samples; give at least one")
    return data


def split_multitask(
    data: MultiTaskData, test_fraction: float, val_fraction: float, seed: int
) -> MultiTaskSplits:
    """Shuffle with `seed` and cut into train / val / test, each class of the first classification
    task cut in the same proportions. Regression targets are standardised with the train split's
    mean and std over its labelled values, so MSE terms of different tasks share one scale."""
    n = len(data)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n - n_test - n_val < 1 or n_test < 1 or n_val < 1:
        raise StillroomError(
            f"dataset {data.name!r} has {n} samples: too few for test_fraction={test_fraction} and "
            f"val_fraction={val_fraction}; give more data or change the fractions"
        )
    gen = torch.Generator().manual_seed(seed)
    strata = next((t for t, info in data.tasks.items() if info.kind == "classification"), None)
    if strata is not None:
        test_idx, val_idx, train_idx = _stratified_cut(
            data.targets[strata], test_fraction, val_fraction, gen
        )
    else:
        order = torch.randperm(n, generator=gen)
        test_idx, val_idx, train_idx = (
            order[:n_test],
            order[n_test : n_test + n_val],
            order[n_test + n_val :],
        )
    train, val, test = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)
    for task, info in data.tasks.items():
        if info.kind != "regression":
            continue
        values = train.targets[task]
        mean = values.nanmean(0)
        std = (values - mean).pow(2).nanmean(0).sqrt().clamp_min(1e-8)
        train, val, test = (
            replace(s, targets={**s.targets, task: (s.targets[task] - mean) / std})
            for s in (train, val, test)
        )
    return MultiTaskSplits(train, val, test)


def hide_task_labels(
    data: MultiTaskData, label_fractions: dict[str, float], seed: int
) -> MultiTaskData:
    """Keep the labels of `label_fractions[task]` of the samples for each task, hide the rest.

    Each task draws its own subset (a sample may keep its class but lose its slant); classes keep at
    least one label each. Hidden labels become IGNORE_INDEX / NaN: no hard-label loss there, while a
    teacher still gives soft targets for every input and every task.
    """
    targets = dict(data.targets)
    for position, (task, fraction) in enumerate(label_fractions.items()):
        info = data.tasks[task]
        single = ArrayData(data.inputs, targets[task], info.kind, info.num_outputs, data.name)
        # a seed per task: the same fraction on two tasks must not hide the same samples
        targets[task] = hide_labels(single, fraction, seed + 7919 * position).targets
    return replace(data, targets=targets)


def labelled_any(data: MultiTaskData, tasks: list[str] | None = None) -> MultiTaskData:
    """The samples with a label for at least one of `tasks` (default: every task): all a student
    trained without a teacher can learn from."""
    keep = torch.zeros(len(data), dtype=torch.bool)
    for task in tasks or list(data.tasks):
        keep |= data.labelled(task)
    return data.subset(torch.nonzero(keep).flatten())


class MultiTaskDataset(Dataset):
    """(inputs[i], {task: targets[task][i]}, i) for tensors held in memory."""

    def __init__(self, data: MultiTaskData, tasks: list[str] | None = None) -> None:
        self.inputs = data.inputs
        self.targets = {task: data.targets[task] for task in tasks or list(data.tasks)}

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        return self.inputs[i], {task: values[i] for task, values in self.targets.items()}, i


def make_multitask_loader(
    data: MultiTaskData, batch_size: int, shuffle: bool, tasks: list[str] | None = None
) -> DataLoader:
    """A DataLoader yielding `(inputs, {task: targets}, index)` over `tasks` (default: all);
    the training loop seeds its shuffling per epoch."""
    return DataLoader(MultiTaskDataset(data, tasks), batch_size=batch_size, shuffle=shuffle)
