"""Taps: names in nested modules, repeated calls, tuple outputs, hook removal, gradients, shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.taps import Taps, feature_shapes, layer_names


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Net(nn.Module):
    """A custom module holding a Sequential of custom modules: names like "block.0.conv"."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(Block(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class Shared(nn.Module):
    """One Linear applied twice (weight sharing): (N, 4) -> (N, 4) -> (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


class Attention(nn.Module):
    """nn.MultiheadAttention returns (out, weights): a tuple-output module."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x)
        return out


def has_no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_nested_names_capture_the_module_outputs(net):
    x = images()
    with Taps(net, ["block.0.conv", "block", "head.1"]) as taps:
        out = net(x)
        feats = taps.outputs
    assert list(feats) == ["block.0.conv", "block", "head.1"]
    assert feats["block.0.conv"].shape == (2, 4, 8, 8)
    assert feats["block"].shape == (2, 4, 4, 4)
    torch.testing.assert_close(feats["block.0.conv"], net.block[0].conv(x))
    assert torch.equal(feats["head.1"], out)
    assert has_no_hooks(net)
    assert "block.0.conv" in layer_names(net) and "" not in layer_names(net)


def test_attach_remove_clear_and_run(net):
    taps = Taps(net, ["block"]).attach()
    assert taps.attached and not has_no_hooks(net)
    with pytest.raises(StillroomError, match="already attached"):
        taps.attach()
    out, feats = taps.run(images())
    assert torch.equal(out, net(images())) and feats["block"].shape == (2, 4, 4, 4)
    taps.clear()
    with pytest.raises(StillroomError, match=r"did not run since the last clear"):
        _ = taps.outputs
    taps.remove()
    taps.remove()  # idempotent
    assert has_no_hooks(net) and not taps.attached


def test_hooks_removed_after_exception(net):
    with pytest.raises(RuntimeError), Taps(net, ["block.0.conv", "head"]):
        net(torch.randn(2, 3, 8, 8))  # wrong channel count fails inside the forward
    assert has_no_hooks(net)
    with pytest.raises(KeyError), Taps(net, ["head"]):
        raise KeyError("raised in the body")
    assert has_no_hooks(net)


def test_unknown_name_lists_close_matches(net):
    with pytest.raises(StillroomError) as err:
        Taps(net, ["block.0.cnv"])
    message = str(err.value)
    assert "'block.0.conv'" in message and "layer_names(model)" in message
    with pytest.raises(StillroomError, match="no close match"):
        Taps(net, ["zzzzzzzzzzzz"])
    assert has_no_hooks(net)


@pytest.mark.parametrize(
    ("names", "kwargs", "match"),
    [
        ([], {}, "at least one"),
        ("block", {}, "list of module names"),
        (["block", "block"], {}, "more than once"),
        (["block"], {"on_repeat": "sum"}, "on_repeat"),
        (["block"], {"select": {"head": 0}}, "not among the tapped names"),
        ([""], {}, "no module named ''"),
    ],
)
def test_bad_arguments(net, names, kwargs, match):
    with pytest.raises(StillroomError, match=match):
        Taps(net, names, **kwargs)


def test_twice_called_module_each_on_repeat_option():
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(3, 4)
    first = model.layer(x)
    second = model.layer(torch.tanh(first))

    for on_repeat, expected in [("last", second), ("first", first)]:
        with Taps(model, ["layer"], on_repeat=on_repeat) as taps:
            model(x)
            torch.testing.assert_close(taps.outputs["layer"], expected)

    with Taps(model, ["layer"], on_repeat="stack") as taps:
        model(x)
        stacked = taps.outputs["layer"]
    assert stacked.shape == (2, 3, 4)
    torch.testing.assert_close(stacked, torch.stack([first, second]))

    with Taps(model, ["layer"], on_repeat="error"), pytest.raises(StillroomError, match="twice"):
        model(x)
    assert has_no_hooks(model)


def test_error_mode_accepts_one_call_per_window(net):
    with Taps(net, ["block"], on_repeat="error") as taps:
        for _ in range(2):
            taps.clear()  # a fresh window per forward pass: not a repeat
            net(images())
            assert taps.outputs["block"].shape == (2, 4, 4, 4)


def test_stack_of_different_shapes_fails_clearly():
    layer = nn.Flatten()
    with Taps(nn.Sequential(layer), ["0"], on_repeat="stack") as taps:
        layer(torch.zeros(1, 2, 3))
        layer(torch.zeros(1, 4, 3))
        with pytest.raises(StillroomError, match="cannot stack"):
            _ = taps.outputs


def test_tuple_outputs_first_tensor_by_default_and_select():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 5, 8)
    out, weights = model.attn(x, x, x)
    with Taps(model, ["attn"]) as taps:
        model(x)
        torch.testing.assert_close(taps.outputs["attn"], out)
    with Taps(model, ["attn"], select={"attn": 1}) as taps:
        model(x)
        torch.testing.assert_close(taps.outputs["attn"], weights)
        assert taps.outputs["attn"].shape == (2, 5, 5)


def test_nested_and_mapping_selectors():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 6, batch_first=True)
    model = nn.Sequential(lstm)
    x = torch.randn(2, 4, 3)
    out, (h, c) = lstm(x)
    for select, expected in [({}, out), ({"0": (1, 0)}, h), ({"0": (1, -1)}, c)]:
        with Taps(model, ["0"], select=select) as taps:
            lstm(x)
            torch.testing.assert_close(taps.outputs["0"], expected)
    with Taps(model, ["0"], select={"0": 1}) as taps, pytest.raises(StillroomError, match="tuple"):
        lstm(x)  # (h, c) is a tuple, not a tensor

    class DictOut(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"hidden": x + 1, "logits": x * 3}

    wrapper = nn.Sequential()
    wrapper.add_module("enc", DictOut())
    with Taps(wrapper, ["enc"]) as taps:
        wrapper(torch.ones(1))
        assert taps.outputs["enc"].item() == 2.0
    with Taps(wrapper, ["enc"], select={"enc": "logits"}) as taps:
        wrapper(torch.ones(1))
        assert taps.outputs["enc"].item() == 3.0
    with (
        Taps(wrapper, ["enc"], select={"enc": "nope"}),
        pytest.raises(StillroomError, match="keys"),
    ):
        wrapper(torch.ones(1))


def test_student_taps_carry_gradients(net):
    with Taps(net, ["block"]) as taps:
        net(images())
        feats = taps.outputs["block"]
    assert feats.requires_grad
    feats.pow(2).mean().backward()
    assert net.block[0].conv.weight.grad is not None
    assert net.head[1].weight.grad is None  # only the tapped path received gradient


def test_teacher_taps_hold_no_graph(net):
    with Taps(net, ["block"], detach=True) as taps:
        net(images())
        assert not taps.outputs["block"].requires_grad
    with torch.inference_mode(), Taps(net, ["block", "head"]) as taps:
        net(images())
        feats = taps.outputs
    assert all(t.is_inference() and not t.requires_grad for t in feats.values())


def test_in_place_change_after_capture_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    with Taps(model, ["0"]) as taps:
        model(torch.randn(2, 4))
        with pytest.raises(StillroomError, match="modified in place"):
            _ = taps.outputs
    with Taps(model, ["1"]) as taps:
        model(torch.randn(2, 4))
        assert taps.outputs["1"].min() >= 0


def test_feature_shapes_keeps_training_state(net):
    net.train()
    net.block[0].conv.eval()  # a mixed state must come back exactly
    shapes = feature_shapes(net, images(1), ["block.0.conv", "block", "head"])
    assert shapes == {"block.0.conv": (1, 4, 8, 8), "block": (1, 4, 4, 4), "head": (1, 3)}
    assert net.training and net.head.training and not net.block[0].conv.training
    assert has_no_hooks(net)


def test_feature_shapes_does_not_touch_batchnorm_statistics():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = model[1].running_mean.clone()
    shapes = feature_shapes(model, torch.randn(1, 4) + 5, ["1"])  # a batch of 1 fails in train
    assert shapes == {"1": (1, 3)}
    assert torch.equal(model[1].running_mean, before) and model.training
