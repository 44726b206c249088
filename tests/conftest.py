"""Small shared fixtures: a tiny digits split and model builders that keep every run fast."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from stillroom.data import Splits, load_dataset, split
from stillroom.models import build_model

# runs started in this process would otherwise pick `threads: auto` from the machine's load and
# change torch's threads between tests; a set OMP_NUM_THREADS keeps torch's count as it started
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_full() -> Splits:
    return split(load_dataset("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def digits(digits_full: Splits) -> Splits:
    """160 train / 64 val / 64 test digits: 5 batches of 32 per epoch."""
    return Splits(
        train=digits_full.train.subset(torch.arange(160)),
        val=digits_full.val.subset(torch.arange(64)),
        test=digits_full.test.subset(torch.arange(64)),
    )


@pytest.fixture
def make_mlp() -> Callable[..., nn.Module]:
    """make_mlp(hidden=[16], outputs=10, dropout=0.0, seed=0): the same weights for the same seed."""

    def make(
        hidden: list[int] | None = None,
        outputs: int = 10,
        dropout: float = 0.0,
        seed: int = 0,
        input_shape: tuple[int, ...] = (1, 8, 8),
    ) -> nn.Module:
        torch.manual_seed(seed)
        spec = {"kind": "mlp", "hidden": hidden if hidden is not None else [16], "dropout": dropout}
        return build_model(spec, input_shape, outputs)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine a second thread waits at every op's barrier
    for a core another process holds, which makes timing-heavy tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
