"""Training options a paper's recipe needs: keep the last epoch or the best, SGD momentum and
Nesterov as fields, the max-norm weight constraint (Hinton et al. 2012)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stillroom.config import load_recipe
from stillroom.data import ArrayData, make_loader
from stillroom.errors import StillroomError
from stillroom.train import TrainArgs, distill
from stillroom.train.loop import _build_optimizer


def _data(n: int = 96) -> ArrayData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    return ArrayData(x, (x[:, 0] > 0).long(), "classification", 2, "toy")


def _train(**args) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    data = _data()
    result = distill(
        None, student, make_loader(data, 16, True), make_loader(data, 64, False),
        args=TrainArgs(alpha=0.0, progress=False, cpu=True, **args),
    )  # fmt: skip
    return student, result


def test_keep_last_returns_the_final_epoch() -> None:
    _, last = _train(epochs=4, lr=0.5, keep="last")
    assert last.best_epoch == 4
    _, best = _train(epochs=4, lr=0.5)
    assert 1 <= best.best_epoch <= 4


def test_max_norm_bounds_every_units_incoming_weights() -> None:
    student, _ = _train(epochs=2, lr=1.0, max_norm=0.5)
    for layer in (student[0], student[2]):
        assert layer.weight.norm(dim=1).max() <= 0.5 + 1e-5


def test_sgd_momentum_and_nesterov_are_fields() -> None:
    model = nn.Linear(2, 2)
    sgd = _build_optimizer(model, TrainArgs(optimizer="sgd", momentum=0.5, nesterov=False))
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["nesterov"] is False


def test_bad_combinations_are_one_line_at_load() -> None:
    with pytest.raises(StillroomError, match="keep: last returns the final epoch"):
        load_recipe(None, ["distill.keep=last", "distill.patience=3"])
    with pytest.raises(StillroomError, match="nesterov needs momentum > 0"):
        load_recipe(None, ["distill.optimizer=sgd", "distill.momentum=0"])
