"""Dense prediction: the maths of the dense losses against references and limits, the metrics
against scikit-learn and hand-made detections, the scenes' ground truth, the fcn family, the
user's arrays checked in one line, and (N, C, H, W) outputs through `evaluate`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stillroom.dense.metrics import (
    decode_detections,
    detection_map,
    segmentation_metrics,
    segmentation_sums,
)
from stillroom.dense.models import FCN
from stillroom.dense.scenes import make_scenes, read_dense_npz
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.losses.dense import (
    box_distillation_loss,
    centernet_loss,
    channel_wise_loss,
    heatmap_distillation_loss,
    render_heatmaps,
    segmentation_loss,
)
from stillroom.objective import TermSpec, build_objective
from stillroom.terms import StepOutputs
from stillroom.train import evaluate


def _maps(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- channel-wise distillation (Shu et al. 2021) -------------------------------------------------


def test_cwd_is_zero_for_identical_maps_and_positive_otherwise() -> None:
    s, t = _maps(2, 3, 5, 5), _maps(2, 3, 5, 5, seed=1)
    assert channel_wise_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_wise_loss(s, t, 4.0).item() > 0


def test_cwd_is_the_per_channel_spatial_kl_times_t_squared() -> None:
    s, t, temperature = _maps(2, 3, 4, 6), _maps(2, 3, 4, 6, seed=1), 2.0
    expected = 0.0
    for n in range(2):
        for c in range(3):
            p = F.softmax(t[n, c].flatten() / temperature, 0)
            q = F.softmax(s[n, c].flatten() / temperature, 0)
            expected += float((p * (p.log() - q.log())).sum())
    expected = expected / 6 * temperature**2
    assert channel_wise_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_ignores_a_constant_added_to_a_channel_map() -> None:
    # a softmax over positions: only where a channel is active matters, not its offset
    s, t = _maps(1, 2, 4, 4), _maps(1, 2, 4, 4, seed=1)
    shifted = s + torch.tensor([3.0, -7.0]).view(1, 2, 1, 1)
    assert channel_wise_loss(shifted, t).item() == pytest.approx(channel_wise_loss(s, t).item())


def test_cwd_refuses_maps_of_two_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        channel_wise_loss(_maps(1, 2, 4, 4), _maps(1, 2, 8, 8))


# --- detection head ------------------------------------------------------------------------------


BOXES = torch.tensor(
    [[[3, 0.0, 0.0, 0.5, 0.5], [1, 0.5, 0.25, 1.0, 1.0]], [[0, 0.25, 0.25, 0.75, 0.75], [-1] * 5]]
)


def test_rendered_heatmaps_peak_at_each_centre_with_sizes_in_cells() -> None:
    heat, sizes, centres = render_heatmaps(BOXES, 4, (8, 8))
    assert heat.shape == (2, 4, 8, 8) and heat.max() == 1.0
    # box 0 of image 0: centre (2, 2) in cells, class 3; box 1: (6, 5), class 1
    assert heat[0, 3, 2, 2] == 1.0 and heat[0, 1, 5, 6] == 1.0
    assert heat[0, 0].max() == 0.0 and heat[1, 0, 4, 4] == 1.0
    assert sizes[0].tolist() == [[4.0, 4.0], [4.0, 6.0]]
    assert centres.tolist() == [[2 * 8 + 2, 5 * 8 + 6], [4 * 8 + 4, -1]]


def _perfect_head(boxes: torch.Tensor, classes: int, size: tuple[int, int]) -> torch.Tensor:
    """A head whose heatmaps are the rendered targets (as logits) and sizes the true sizes."""
    heat, sizes, centres = render_heatmaps(boxes, classes, size)
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    size_maps = torch.zeros(boxes.shape[0], 2, *size)
    for n in range(boxes.shape[0]):
        for m in range(boxes.shape[1]):
            if centres[n, m] >= 0:
                y, x = divmod(int(centres[n, m]), size[1])
                size_maps[n, :, y, x] = sizes[n, m]
    return torch.cat([logits, size_maps], dim=1)


def test_centernet_loss_is_small_for_the_rendered_targets_and_large_for_noise() -> None:
    perfect = _perfect_head(BOXES, 4, (8, 8))
    assert centernet_loss(perfect, BOXES).item() < 0.05
    assert centernet_loss(_maps(2, 6, 8, 8), BOXES).item() > 1.0


def test_decoded_rendered_targets_score_map50_one_and_shifted_boxes_zero() -> None:
    detections = decode_detections(_perfect_head(BOXES, 4, (8, 8)))
    assert detection_map(detections, BOXES, 4)["map50"] == pytest.approx(1.0)
    shifted = detections.clone()
    shifted[..., [0, 2]] += 0.4  # IoU with the truth falls under 0.5
    assert detection_map(shifted, BOXES, 4)["map50"] < 0.05
    relabelled = detections.clone()
    relabelled[relabelled[..., 4] < 0.5, :4] = 0.0  # keep only the confident peaks
    relabelled[..., 5] = (relabelled[..., 5] + 1) % 4  # the right place, the wrong class
    assert detection_map(relabelled, BOXES, 4)["map50"] == pytest.approx(0.0)


def test_heatmap_term_is_bce_minus_the_teachers_entropy_times_t_squared() -> None:
    s, t = _maps(2, 3, 4, 4), _maps(2, 3, 4, 4, seed=1)
    assert heatmap_distillation_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p, q = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
    kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()  # Bernoulli KL per cell
    assert heatmap_distillation_loss(s, t, 2.0).item() == pytest.approx(
        float(kl.mean() * 4), rel=1e-4
    )


def test_box_term_counts_only_where_the_teacher_sees_objects() -> None:
    s, t = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    s[0, :, 0, 0] = 5.0  # wrong sizes on a cell the teacher calls background
    heat = torch.full((1, 3, 4, 4), -30.0)
    heat[0, 1, 2, 2] = 30.0  # the teacher's one object, where the sizes agree
    assert box_distillation_loss(s, t, heat).item() == pytest.approx(0.0, abs=1e-6)
    s[0, :, 2, 2] = torch.tensor([1.0, 2.0])
    assert box_distillation_loss(s, t, heat).item() == pytest.approx(3.0, rel=1e-4)


# --- segmentation --------------------------------------------------------------------------------


def test_miou_and_pixel_accuracy_match_scikit_learn_with_ignored_pixels_left_out() -> None:
    from sklearn.metrics import accuracy_score, jaccard_score

    logits = _maps(3, 4, 6, 6)
    masks = torch.randint(0, 4, (3, 6, 6), generator=torch.Generator().manual_seed(2))
    masks[0, :2] = IGNORE_INDEX
    scores = segmentation_metrics(segmentation_sums(logits, masks).sum(0))
    keep = masks != IGNORE_INDEX
    truth, predicted = masks[keep].numpy(), logits.argmax(1)[keep].numpy()
    assert scores["pixel_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert scores["miou"] == pytest.approx(jaccard_score(truth, predicted, average="macro"))


def test_segmentation_loss_skips_ignored_pixels_and_upsamples_low_resolution_logits() -> None:
    logits, masks = _maps(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    masks[1] = IGNORE_INDEX
    expected = F.cross_entropy(up[:1], masks[:1])
    assert segmentation_loss(logits, masks).item() == pytest.approx(expected.item(), rel=1e-5)


def test_classification_of_every_pixel_evaluates_instead_of_crashing() -> None:
    """The issue's crash: (N, C, H, W) logits with (N, H, W) labels in `evaluate`."""
    model = nn.Conv2d(1, 3, 1)
    inputs = _maps(8, 1, 16, 16)
    labels = torch.randint(0, 3, (8, 16, 16), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=3)
    scores = evaluate(model, loader, "classification")
    with torch.no_grad():
        expected = (model(inputs).argmax(1) == labels).float().mean().item()
    assert scores["accuracy"] == pytest.approx(expected)
    seg = evaluate(model, loader, "segmentation")
    assert seg["pixel_accuracy"] == pytest.approx(expected) and 0 <= seg["miou"] <= 1


# --- terms through the objective -----------------------------------------------------------------


def test_dense_terms_align_a_lower_resolution_student_to_the_teacher() -> None:
    student, teacher = FCN((1, 16, 16), [4, 8], 6, 2), FCN((1, 16, 16), [4, 8], 6, 1)
    specs = [TermSpec("cwd", temperature=2.0), TermSpec("heatmap"), TermSpec("box")]
    terms = build_objective(specs, "detection", student, teacher, None)
    s_out, t_out = _maps(2, 6, 8, 8), _maps(2, 6, 16, 16, seed=1)
    step = StepOutputs(s_out.requires_grad_(), t_out, None)
    values = {t.name: t.compute(step) for t in terms}
    assert all(math.isfinite(v.item()) and v.item() >= 0 for v in values.values())
    sum(values.values()).backward()
    assert s_out.grad is not None and s_out.grad.abs().sum() > 0


def test_cwd_between_layers_of_two_widths_learns_a_projector() -> None:
    student, teacher = FCN((1, 16, 16), [4, 8], 11), FCN((1, 16, 16), [8, 16], 11)
    example = torch.zeros(2, 1, 16, 16)
    (term,) = build_objective(
        [TermSpec("cwd", student="stages.1", teacher="stages.1")],
        "segmentation",
        student,
        teacher,
        example,
        temperature=4.0,
    )
    assert isinstance(term.projector, nn.Module) and term.teacher_layers == ("stages.1",)


def test_heatmap_terms_refuse_a_segmentation_run() -> None:
    with pytest.raises(StillroomError, match="reads a detection head"):
        build_objective([TermSpec("box")], "segmentation", nn.Identity(), None, None)


# --- scenes, models, the user's arrays -----------------------------------------------------------


def test_scenes_masks_and_boxes_agree_and_are_seeded() -> None:
    seg = make_scenes(12, "segmentation", seed=5)
    det = make_scenes(12, "detection", seed=5)
    assert torch.equal(seg.inputs, det.inputs)  # one seed, one set of scenes
    assert torch.equal(seg.inputs, make_scenes(12, "segmentation", seed=5).inputs)
    assert seg.num_outputs == 11 and det.num_outputs == 12
    for mask, boxes in zip(seg.targets, det.targets, strict=True):
        for c, x0, y0, x1, y1 in boxes[boxes[:, 0] >= 0].tolist():
            region = mask[round(y0 * 32) : round(y1 * 32), round(x0 * 32) : round(x1 * 32)]
            assert (region == c + 1).any()  # the box holds its digit's pixels
        assert set(mask.unique().tolist()) - {0} == {int(c) + 1 for c in boxes[boxes[:, 0] >= 0, 0]}


def test_fcn_output_stride_and_a_canvas_it_cannot_halve() -> None:
    assert FCN((1, 32, 32), [4, 8, 16], 5, 1)(torch.zeros(1, 1, 32, 32)).shape == (1, 5, 32, 32)
    assert FCN((1, 32, 32), [4, 8, 16], 5, 4)(torch.zeros(1, 1, 32, 32)).shape == (1, 5, 8, 8)
    with pytest.raises(StillroomError, match="must be a multiple of 4"):
        FCN((1, 30, 30), [4, 8, 16], 5)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_masks_with_more_classes_than_the_head_are_one_line(tmp_path: Path) -> None:
    masks = np.zeros((4, 8, 8), np.int64)
    masks[0, 0, 0] = 5
    masks[1, 0, 0] = 255  # ignored, not a class
    path = _npz(tmp_path / "m.npz", inputs=np.zeros((4, 1, 8, 8), np.float32), masks=masks)
    data, classes = read_dense_npz(path, "segmentation", None)
    assert classes == 6 and data.targets[1, 0, 0] == IGNORE_INDEX
    with pytest.raises(StillroomError, match="masks hold class 5 but the head has 3 classes"):
        read_dense_npz(path, "segmentation", 3)


def test_boxes_outside_the_image_are_one_line(tmp_path: Path) -> None:
    boxes = np.full((2, 2, 5), -1.0, np.float32)
    boxes[0, 0] = [1, 2, 2, 6, 6]
    inputs = np.zeros((2, 1, 8, 8), np.float32)
    data, classes = read_dense_npz(_npz(tmp_path / "ok.npz", inputs=inputs, boxes=boxes),
                                   "detection", None)  # fmt: skip
    assert classes == 2 and data.targets[0, 0].tolist() == [1, 0.25, 0.25, 0.75, 0.75]
    boxes[1, 1] = [0, 4, 4, 9, 6]
    path = _npz(tmp_path / "bad.npz", inputs=inputs, boxes=boxes)
    with pytest.raises(StillroomError, match=r"box \[4.0, 4.0, 9.0, 6.0\] of image 1 is outside"):
        read_dense_npz(path, "detection", None)


def test_a_pixel_soft_target_run_from_python_trains_and_validates() -> None:
    """The issue's repro: distill() with (N, C, H, W) soft targets used to crash validating."""
    from stillroom.data import make_loader
    from stillroom.train import distill

    train, val = make_scenes(16, "segmentation", 0), make_scenes(8, "segmentation", 1)
    torch.manual_seed(0)
    teacher, student = FCN((1, 32, 32), [4, 8], 11), FCN((1, 32, 32), [4, 8], 11)
    loaders = make_loader(train, 8, shuffle=True), make_loader(val, 8, shuffle=False)
    for task, metric in (("classification", "val/accuracy"), ("segmentation", "val/miou")):
        result = distill(teacher, student, *loaders, task=task, epochs=1, progress=False)
        assert 0 <= result.history[0][metric] <= 1
