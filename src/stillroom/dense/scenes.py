"""Dense data with real ground truth: scenes of scikit-learn digits on a canvas (built in), and
the user's own arrays (.npz).

A scene places 1..max_digits digits (8x8, upscaled) at random, non-overlapping places on a
canvas with a little noise; each digit's pixels (above half its intensity scale) are its class
in the mask and its tight box is known. Training scenes draw their digits from 70% of the
1,797 digit images, validation and test scenes from the other 30%: a test digit was never seen.

Targets, as the loop and the metrics read them:
    segmentation  (N, H, W) int64 class ids, 0 = background, digit d = d + 1; IGNORE_INDEX skipped
    detection     (N, M, 5) float32 rows (class, x0, y0, x1, y1) in fractions of the image width
                  and height (x1, y1 exclusive), padded with rows of class -1

The user's .npz: `inputs` (N, C, H, W) float and, for segmentation, `masks` (N, H, W) integer
class ids (`ignore_index` marks unlabelled pixels); for detection, `boxes` (N, M, 5) float rows
(class, x0, y0, x1, y1) in pixels (x1, y1 exclusive, 0 <= x0 < x1 <= W), padded with class -1.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.data import ArrayData
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX

TASKS = ("segmentation", "detection")
DIGIT_CLASSES = 10
THRESHOLD = 0.5  # a digit pixel belongs to the digit (mask, box) above this intensity in [0, 1]
TRAIN_POOL = 0.7  # the share of the digit images that training scenes draw from


def head_outputs(task: str, num_classes: int) -> int:
    """Channels of the model head: one logit per class (segmentation), or a heatmap per class
    plus width and height (detection)."""
    return num_classes + 2 if task == "detection" else num_classes


def scene_classes(task: str) -> int:
    """Segmentation adds the background class 0 to the ten digits."""
    return DIGIT_CLASSES + 1 if task == "segmentation" else DIGIT_CLASSES


@cache  # read once per process: the train, val and test scenes draw from the same images
def _digit_pool(held_out: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    cut = int(TRAIN_POOL * len(order))
    chosen = order[cut:] if held_out else order[:cut]
    return bunch.images[chosen].astype(np.float32) / 16.0, bunch.target[chosen]


def make_scenes(
    n: int,
    task: str,
    seed: int,
    *,
    held_out: bool = False,
    canvas: int = 32,
    scale: int = 2,
    max_digits: int = 3,
    noise: float = 0.05,
) -> ArrayData:
    """`n` scenes of `canvas` x `canvas` pixels, 1..max_digits digits each (8 * scale pixels
    square), seeded; held_out: digits from the images training scenes never use."""
    side = 8 * scale
    if side > canvas:
        raise StillroomError(f"a digit of {side} pixels (8 * scale) does not fit a {canvas} canvas")
    images, labels = _digit_pool(held_out)
    patches = F.interpolate(
        torch.from_numpy(images)[:, None], scale_factor=scale, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    rng = np.random.default_rng(seed)
    inputs = np.zeros((n, 1, canvas, canvas), np.float32)
    masks = np.zeros((n, canvas, canvas), np.int64)
    boxes = np.full((n, max_digits, 5), -1.0, np.float32)
    for i in range(n):
        placed: list[tuple[int, int]] = []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            for _attempt in range(20):  # non-overlapping places: masks and boxes stay exact
                y, x = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
                if all(abs(y - py) >= side or abs(x - px) >= side for py, px in placed):
                    break
            else:
                continue
            k = int(rng.integers(len(labels)))
            patch, digit = patches[k], int(labels[k])
            region = inputs[i, 0, y : y + side, x : x + side]
            np.maximum(region, patch, out=region)
            on = patch > THRESHOLD
            masks[i, y : y + side, x : x + side][on] = digit + 1
            rows, cols = np.nonzero(on)
            j = len(placed)
            boxes[i, j] = (digit, x + cols.min(), y + rows.min(), x + cols.max() + 1,
                           y + rows.max() + 1)  # fmt: skip
            placed.append((y, x))
    inputs = np.clip(inputs + rng.normal(0, noise, inputs.shape).astype(np.float32), 0, 1)
    name = f"scenes_{task}"
    x_t = torch.from_numpy(inputs)
    if task == "segmentation":
        targets = torch.from_numpy(masks)
    else:
        targets = torch.from_numpy(_to_fractions(boxes, canvas, canvas))
    return ArrayData(x_t, targets, task, head_outputs(task, scene_classes(task)), name)


def _to_fractions(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    out = boxes.astype(np.float32).copy()
    valid = out[..., 0] >= 0
    out[..., [1, 3]] /= width
    out[..., [2, 4]] /= height
    out[~valid] = -1.0
    return out


def read_dense_npz(
    path: Path, task: str, num_classes: int | None, ignore_index: int = 255
) -> tuple[ArrayData, int]:
    """The user's arrays as (data, number of classes), checked: one line for any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise StillroomError(f"data file {path} does not exist; check data.path")
    wanted = "masks" if task == "segmentation" else "boxes"
    try:
        with np.load(path, allow_pickle=False) as arrays:  # no pickles: a file must not run code
            missing = {"inputs", wanted} - set(arrays.files)
            if missing:
                raise StillroomError(
                    f"{path} lacks array(s) {sorted(missing)} for {task}; it holds {arrays.files}. "
                    f"Save it with np.savez(path, inputs=X, {wanted}=...)"
                )
            inputs, labels = arrays["inputs"], arrays[wanted]
    except (ValueError, OSError) as err:
        raise StillroomError(f"cannot read {path} as .npz without pickles ({err})") from None
    if inputs.ndim != 4 or not np.issubdtype(inputs.dtype, np.number):
        raise StillroomError(
            f"{path}: inputs must be numbers shaped (N, C, H, W), got {inputs.dtype} {inputs.shape}"
        )
    n, _, height, width = inputs.shape
    if len(labels) != n:
        raise StillroomError(f"{path}: {n} inputs but {len(labels)} {wanted}; they must match")
    if task == "segmentation":
        targets, classes = _check_masks(path, labels, (n, height, width), num_classes, ignore_index)
    else:
        targets, classes = _check_boxes(path, labels, height, width, num_classes)
    data = ArrayData(
        torch.tensor(inputs, dtype=torch.float32),
        targets,
        task,
        head_outputs(task, classes),
        path.stem,
    )
    return data, classes


def _check_masks(
    path: Path, masks: np.ndarray, shape: tuple[int, ...], num_classes: int | None, ignore: int
) -> tuple[torch.Tensor, int]:
    if masks.shape != shape or not np.issubdtype(masks.dtype, np.integer):
        raise StillroomError(
            f"{path}: masks must be integer class ids shaped {shape} (N, H, W), got {masks.dtype} "
            f"{masks.shape}"
        )
    labelled = masks[masks != ignore]
    if labelled.size and labelled.min() < 0:
        raise StillroomError(
            f"{path}: masks hold class {int(labelled.min())}; classes are 0.. and {ignore} "
            "(data.ignore_index) marks unlabelled pixels"
        )
    top = int(labelled.max()) if labelled.size else 0
    classes = num_classes if num_classes is not None else top + 1
    if top >= classes:
        raise StillroomError(
            f"{path}: masks hold class {top} but the head has {classes} classes "
            f"(data.num_classes); raise data.num_classes to {top + 1} or fix the masks"
        )
    targets = torch.tensor(masks, dtype=torch.int64)
    targets[targets == ignore] = IGNORE_INDEX
    return targets, classes


def _check_boxes(
    path: Path, boxes: np.ndarray, height: int, width: int, num_classes: int | None
) -> tuple[torch.Tensor, int]:
    if boxes.ndim != 3 or boxes.shape[2] != 5 or not np.issubdtype(boxes.dtype, np.number):
        raise StillroomError(
            f"{path}: boxes must be numbers shaped (N, M, 5): (class, x0, y0, x1, y1) rows, "
            f"padded with class -1; got {boxes.dtype} {boxes.shape}"
        )
    boxes = boxes.astype(np.float64)
    valid = boxes[..., 0] >= 0
    rows = boxes[valid]
    if len(rows) and not np.all(rows[:, 0] == np.round(rows[:, 0])):
        raise StillroomError(f"{path}: a box class is not a whole number; classes are 0, 1, ...")
    top = int(rows[:, 0].max()) if len(rows) else 0
    classes = num_classes if num_classes is not None else top + 1
    if top >= classes:
        raise StillroomError(
            f"{path}: boxes hold class {top} but the head has {classes} classes "
            f"(data.num_classes); raise data.num_classes to {top + 1} or fix the boxes"
        )
    x0, y0, x1, y1 = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
    inside = (x0 >= 0) & (y0 >= 0) & (x1 <= width) & (y1 <= height) & (x0 < x1) & (y0 < y1)
    if not inside.all():
        bad = rows[~inside][0]
        image = int(np.nonzero(valid)[0][np.nonzero(~inside)[0][0]])
        raise StillroomError(
            f"{path}: box {bad[1:].tolist()} of image {image} is outside the {width}x{height} "
            "image or empty; boxes are (x0, y0, x1, y1) pixels with 0 <= x0 < x1 <= W and "
            "0 <= y0 < y1 <= H"
        )
    return torch.from_numpy(_to_fractions(boxes, height, width)), classes
