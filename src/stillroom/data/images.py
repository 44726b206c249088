"""Class-folder image datasets: root/<class name>/<image files>, decoded with PIL into (N, C, H, W).

`decode_images` takes images in the form `datasets` stores them undecoded (`{"path", "bytes"}`, as
with `datasets.Image(decode=False)`), so an image column of a saved `datasets` folder (read by
tables.py) decodes exactly like a class folder.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stillroom.data.builtin import ArrayData
from stillroom.data.mapped import MappedInputs, scratch_array
from stillroom.errors import StillroomError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_MODES = ("L", "RGB")
"""What images become: one grayscale channel or three colour channels."""

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def read_image_folder(
    root: Path,
    *,
    size: tuple[int, int] | None = None,
    mode: str | None = None,
    classes: list[str] | None = None,
    memory_limit_mb: float | None = None,
    workdir: Path | None = None,
) -> tuple[ArrayData, dict[str, Any]]:
    """Every image under root/<class>/ (nested folders included), labelled by its class folder.

    classes: None for a training folder (the sorted subfolder names); the training classes for a
    val/test folder, so class ids match (a class may have no folder there, but an extra folder is an
    error). size (H, W) resizes with bilinear filtering; None needs every image to share one size.
    mode "L" or "RGB"; None picks "L" when every image is grayscale. Decoded pixels over
    `memory_limit_mb` go to a scratch file in `workdir` and are read a batch at a time.

    Returns the data (inputs (N, C, H, W) float32 in [0, 1], targets (N,) int64) and the JSON-able
    settings {"size": [H, W], "mode", "classes", "images": N} to read later folders the same way.
    """
    root = Path(root)
    folders = _class_folders(root)
    if classes is None:
        classes = folders
    else:
        extra = [name for name in folders if name not in classes]
        if extra:
            raise StillroomError(
                f"class folder {extra[0]!r} in {root} is not one of the training classes "
                f"({', '.join(classes)}); remove it or rename it to a training class"
            )
    files = {name: _image_files(root / name) for name in folders}
    if not any(files.values()):
        raise StillroomError(
            f"no images under {root} (read: {', '.join(IMAGE_SUFFIXES)}); put each class's images "
            f"in {root}/<class name>/"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for name in folders:
        if not files[name]:
            raise StillroomError(
                f"class folder {root / name} has no images (read: {', '.join(IMAGE_SUFFIXES)}); "
                "add some or remove the folder"
            )
        paths += files[name]
        labels += [classes.index(name)] * len(files[name])
    pixels = decode_images(
        [{"path": str(p), "bytes": None} for p in paths],
        size,
        mode,
        names=[p.relative_to(root).as_posix() for p in paths],
        memory_limit_mb=memory_limit_mb,
        workdir=workdir,
    )
    settings = {
        "size": list(pixels.shape[2:]),
        "mode": "L" if pixels.shape[1] == 1 else "RGB",
        "classes": list(classes),
        "images": len(paths),
    }
    data = ArrayData(
        pixels, torch.tensor(labels, dtype=torch.int64), "classification", len(classes), root.name
    )
    return data, settings


def decode_images(
    items: Sequence[dict[str, Any] | None],
    size: tuple[int, int] | None = None,
    mode: str | None = None,
    *,
    names: Sequence[str] | None = None,
    memory_limit_mb: float | None = None,
    workdir: Path | None = None,
) -> torch.Tensor | MappedInputs:
    """(N, C, H, W) float32 in [0, 1] from undecoded images ({"bytes": ..., "path": ...}; bytes
    first, as a saved `datasets` folder embeds them).

    size (H, W) resizes with bilinear filtering; None needs one shared size. mode "L" (C = 1) or
    "RGB" (C = 3); None picks "L" when every image is grayscale. Alpha channels are dropped.
    names label the images in error messages (default: their paths). Pixels over
    `memory_limit_mb` (as float32) are decoded one image at a time into a scratch file in
    `workdir` (`stillroom.data.mapped.scratch_array`) and come back as `MappedInputs`.
    """
    assert len(items) > 0, "decode_images needs at least one image"
    if mode is not None and mode not in IMAGE_MODES:
        raise StillroomError(f"unknown image mode {mode!r}; use L (grayscale) or RGB")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise StillroomError(
            f"image size {list(size)} is not [H, W] in pixels; give two numbers > 0"
        )
    if names is None:
        names = [(item or {}).get("path") or f"image {i + 1}" for i, item in enumerate(items)]
    if mode is None or size is None:
        # a first pass reads only the headers: deciding mode and size must not hold every image
        headers = [_header(item, name) for item, name in zip(items, names, strict=True)]
        if mode is None:
            mode = "L" if all(m in _GRAY_MODES for m, _ in headers) else "RGB"
        if size is None:
            first_w, first_h = headers[0][1]
            for (_, (w, h)), name in zip(headers, names, strict=True):
                if (w, h) != (first_w, first_h):
                    raise StillroomError(
                        f"images differ in size ({names[0]} {first_h}x{first_w}, {name} {h}x{w}, "
                        "height x width); set data.image_size: [H, W] to resize them all"
                    )
            size = (first_h, first_w)
    height, width = size
    channels = 1 if mode == "L" else 3
    if memory_limit_mb is not None and len(items) * channels * height * width * 4 > (
        memory_limit_mb * 2**20
    ):
        mapped = scratch_array((len(items), channels, height, width), workdir)
        for i, (item, name) in enumerate(zip(items, names, strict=True)):
            mapped[i] = _decode(item, name, mode, (width, height)).transpose(2, 0, 1)
        return MappedInputs(mapped)
    pixels = np.empty((len(items), height, width, channels), dtype=np.float32)
    for i, (item, name) in enumerate(zip(items, names, strict=True)):
        pixels[i] = _decode(item, name, mode, (width, height))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise StillroomError(f"image folder {root} does not exist; check data.path")
    if not root.is_dir():
        raise StillroomError(
            f"{root} is a file; data.path for images must be a folder with one subfolder per class"
        )
    # hidden folders (.ipynb_checkpoints, .git) are tool clutter, never a class
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
        raise StillroomError(
            f"{root} has {'images but ' if loose else ''}no class subfolders; put each class's "
            f"images in {root}/<class name>/"
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    # hidden files are skipped: macOS leaves "._a.png" resource forks next to every copied image
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _unreadable(name: str, err: Exception) -> StillroomError:
    return StillroomError(f"cannot read image {name} ({err}); remove or replace it")


def _open(item: dict[str, Any] | None, name: str) -> Image.Image:
    if item is None or not (item.get("bytes") or item.get("path")):
        raise StillroomError(f"image {name} is missing; fill it in or drop the row")
    return Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])


def _header(item: dict[str, Any] | None, name: str) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)), read without decoding the pixels."""
    try:
        with _open(item, name) as img:
            return img.mode, img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(name, err) from err


def _decode(item: dict[str, Any] | None, name: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 in [0, 1]; size is PIL's (width, height)."""
    try:
        with _open(item, name) as img:
            if img.mode in _SIXTEEN_BIT_MODES:
                # PIL's convert("L") clips 16-bit values at 255 instead of scaling them
                gray = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0)
                if gray.size != size:
                    gray = gray.resize(size, Image.Resampling.BILINEAR)
                array = np.clip(np.asarray(gray), 0.0, 1.0)[..., None]
                return array if mode == "L" else np.repeat(array, 3, axis=2)
            converted = img if img.mode == mode else img.convert(mode)
            if converted.size != size:
                converted = converted.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(name, err) from err
    return array[..., None] if mode == "L" else array
