"""The ResNet reference family: shapes on digits and MNIST sizes, knobs, taps, save/load, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stillroom.errors import StillroomError
from stillroom.models import (
    MODELS,
    ResNet,
    build_model,
    count_parameters,
    load_model,
    save_model,
)
from stillroom.taps import Taps, feature_shapes


def resnet(widths: list[int], blocks: list[int] | int, shape=(1, 8, 8), outputs: int = 10):
    torch.manual_seed(0)
    return build_model({"kind": "resnet", "widths": widths, "blocks": blocks}, shape, outputs)


@pytest.mark.parametrize(
    ("shape", "stage_sizes"),
    [((1, 8, 8), [8, 4, 4]), ((1, 28, 28), [28, 14, 7]), ((3, 32, 32), [32, 16, 8])],
)
def test_output_and_stage_shapes(shape, stage_sizes):
    model = resnet([4, 8, 16], [1, 2, 1], shape)
    assert isinstance(model, ResNet) and "resnet" in MODELS
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 10)
    assert model(x.flatten(1)).shape == (2, 10)  # flat features are reshaped
    names = ["stem", "stages.0", "stages.1", "stages.2", "pool", "head"]
    shapes = feature_shapes(model, x, names)
    assert shapes["stem"] == (2, 4, shape[1], shape[2])
    for i, (width, size) in enumerate(zip([4, 8, 16], stage_sizes, strict=True)):
        assert shapes[f"stages.{i}"] == (2, width, size, size)
    assert shapes["pool"] == (2, 16) and shapes["head"] == (2, 10)
    assert model.feature_size == (stage_sizes[-1], stage_sizes[-1])


def test_four_stages_on_mnist_stop_halving_at_min_size():
    model = resnet([4, 4, 4, 4, 4], 1, (1, 28, 28))
    shapes = feature_shapes(model, torch.randn(1, 1, 28, 28), [f"stages.{i}" for i in range(5)])
    assert [s[-1] for s in shapes.values()] == [28, 14, 7, 4, 4]


def test_parameters_grow_with_width_and_depth():
    base = count_parameters(resnet([4, 8], [1, 1]))
    assert count_parameters(resnet([8, 16], [1, 1])) > base
    assert count_parameters(resnet([4, 8], [2, 2])) > base
    assert count_parameters(resnet([4, 8, 16], [1, 1, 1])) > base


def test_stages_are_tappable_and_train_with_gradients():
    model = resnet([4, 8], 2)
    assert {"stages.0", "stages.1", "stages.1.0", "stages.1.1.conv2", "pool", "head"} <= set(
        dict(model.named_modules())
    )
    with Taps(model, ["stages.0", "stages.1.1"]) as taps:
        model(torch.randn(2, 1, 8, 8))
        feats = taps.outputs  # the in-place check passes: blocks are out of place
    assert feats["stages.1.1"].requires_grad and feats["stages.0"].shape == (2, 4, 8, 8)


def test_save_load_round_trip(tmp_path):
    spec = {"kind": "resnet", "widths": [4, 8], "blocks": [1, 2]}
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), 10)
    model.train()
    model(torch.randn(8, 1, 8, 8))  # move the BatchNorm running stats off their defaults
    model.eval()
    save_model(model, spec, tmp_path, input_shape=[1, 8, 8], num_outputs=10)
    loaded, meta = load_model(tmp_path)
    loaded.eval()
    x = torch.randn(3, 64)
    assert meta["spec"] == spec
    torch.testing.assert_close(loaded(x), model(x))


def test_a_few_steps_reduce_the_loss():
    model = resnet([8, 16], [1, 1])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("widths", "blocks", "shape", "match"),
    [
        ([4, 8], [1], (1, 8, 8), "blocks"),
        ([4, 8], [1, 0], (1, 8, 8), "blocks"),
        ([], 1, (1, 8, 8), "widths"),
        ([4], 1, (64,), "image inputs"),
    ],
)
def test_bad_specs_fail_with_a_fix(widths, blocks, shape, match):
    with pytest.raises(StillroomError, match=match):
        resnet(widths, blocks, shape)
