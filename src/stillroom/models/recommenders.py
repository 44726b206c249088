"""Recommenders that score candidate items for users: NeuMF, a two-tower model, matrix
factorisation, and the mean of several (an ensemble teacher).

Every ranker is served through one tensor so a saved folder exports like any stillroom model:

    forward(candidates: (B, 1 + K) int64) -> (B, K) scores (logits)
        column 0: the user's index, columns 1..K: the candidate items' indices

Ids are the run's encoded indices (ids.json of the run folder maps them back). An id outside
[0, n) is clamped into it, so a serving call never reads out of the tables.

A model folder is a stillroom model folder (model.json + model.safetensors) whose spec is a
`factory` spec naming `build_ranker` in this module: `stillroom.models.load_model` rebuilds it.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.models import allow_factory

FACTORY = "stillroom.models.recommenders:build_ranker"
allow_factory(FACTORY)  # stillroom's own code: rebuilding it imports nothing the user gave


class Ranker(nn.Module):
    """Base of the rankers here: the clamped id split of `forward`, `score` for the maths."""

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items

    def forward(self, candidates: torch.Tensor) -> torch.Tensor:
        ids = candidates.long()
        users = ids[:, 0].clamp(0, self.n_users - 1)
        items = ids[:, 1:].clamp(0, self.n_items - 1)
        return self.score(users, items)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) user indices, (B, K) item indices -> (B, K) scores."""
        raise NotImplementedError


def _init(embedding: nn.Embedding) -> nn.Embedding:
    nn.init.normal_(embedding.weight, std=0.01)
    return embedding


class MatrixFactorisation(Ranker):
    """score(u, i) = <p_u, q_i> + b_i (Koren et al. 2009), the classic real-time student."""

    def __init__(self, n_users: int, n_items: int, dim: int = 8) -> None:
        super().__init__(n_users, n_items)
        self.user = _init(nn.Embedding(n_users, dim))
        self.item = _init(nn.Embedding(n_items, dim))
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.item_bias.weight)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p = self.user(users).unsqueeze(1)  # (B, 1, D)
        q = self.item(items)  # (B, K, D)
        return (p * q).sum(-1) + self.item_bias(items).squeeze(-1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class TwoTower(Ranker):
    """A user tower and an item tower (embedding -> MLP), scored by their dot product (Covington et
    al. 2016; Yi et al. 2019): item vectors can be precomputed for serving."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, hidden: list[int] | None = None):
        super().__init__(n_users, n_items)
        hidden = [dim] if hidden is None else hidden
        self.user = _init(nn.Embedding(n_users, dim))
        self.item = _init(nn.Embedding(n_items, dim))
        self.user_tower = _tower([dim, *hidden])
        self.item_tower = _tower([dim, *hidden])
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.item_bias.weight)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(self.user(users)).unsqueeze(1)
        v = self.item_tower(self.item(items))
        return (u * v).sum(-1) + self.item_bias(items).squeeze(-1)


def _tower(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them, none after the last (the tower's output vector)."""
    return nn.Sequential(_mlp(sizes[:-1]), nn.Linear(sizes[-2], sizes[-1]))


class NeuMF(Ranker):
    """Neural matrix factorisation (He et al. 2017, WWW, sec. 3.4): a generalised MF branch and an
    MLP branch over concatenated embeddings, fused by one linear layer."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        mf_dim: int = 32,
        mlp_dim: int = 32,
        hidden: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(n_users, n_items)
        hidden = [64, 32] if hidden is None else hidden
        self.mf_user = _init(nn.Embedding(n_users, mf_dim))
        self.mf_item = _init(nn.Embedding(n_items, mf_dim))
        self.mlp_user = _init(nn.Embedding(n_users, mlp_dim))
        self.mlp_item = _init(nn.Embedding(n_items, mlp_dim))
        self.mlp = _mlp([2 * mlp_dim, *hidden])
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mf_dim + hidden[-1], 1)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        k = items.shape[1]
        mf = self.mf_user(users).unsqueeze(1) * self.mf_item(items)  # (B, K, mf_dim)
        u = self.mlp_user(users).unsqueeze(1).expand(-1, k, -1)
        mlp = self.mlp(torch.cat([u, self.mlp_item(items)], dim=-1))  # (B, K, hidden[-1])
        return self.out(self.dropout(torch.cat([mf, mlp], dim=-1))).squeeze(-1)


class RankerEnsemble(nn.Module):
    """Several rankers as one: the logit of the mean of their sigmoid probabilities (mean_prob)
    or the mean of their scores (mean_logit). Frozen teachers only; never trained here."""

    def __init__(self, members: list[nn.Module], combine: str = "mean_prob") -> None:
        super().__init__()
        assert combine in ("mean_prob", "mean_logit"), combine
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, candidates: torch.Tensor) -> torch.Tensor:
        return combine_scores(torch.stack([m(candidates) for m in self.members]), self.combine)


def combine_scores(scores: torch.Tensor, combine: str) -> torch.Tensor:
    """(M, ...) the members' scores -> (...) the ensemble's: the mean score (mean_logit), or the
    logit of the mean sigmoid probability (mean_prob)."""
    if combine == "mean_logit":
        return scores.mean(0)
    p = torch.sigmoid(scores).mean(0).clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


RANKERS: dict[str, type[Ranker]] = {
    "mf": MatrixFactorisation,
    "two_tower": TwoTower,
    "neumf": NeuMF,
}
"""The built-in recommender architectures a ranking recipe's `arch` may name."""


def build_ranker(arch: str, n_users: int, n_items: int, **kwargs: Any) -> Ranker:
    """The ranker `arch` (a row of RANKERS) for this many users and items; kwargs: its sizes."""
    if arch not in RANKERS:
        raise StillroomError(f"unknown recommender {arch!r}; available: {', '.join(RANKERS)}")
    try:
        return RANKERS[arch](n_users, n_items, **kwargs)
    except TypeError as err:
        raise StillroomError(f"recommender {arch}: {err}") from None


def ranker_spec(arch: str, n_users: int, n_items: int, **kwargs: Any) -> dict[str, Any]:
    """The stillroom model spec that rebuilds `build_ranker(arch, ...)` (a factory spec)."""
    return {
        "kind": "factory",
        "factory": FACTORY,
        "kwargs": {"arch": arch, "n_users": n_users, "n_items": n_items, **kwargs},
        "search_paths": [],
    }


__all__ = [
    "FACTORY",
    "RANKERS",
    "MatrixFactorisation",
    "NeuMF",
    "Ranker",
    "RankerEnsemble",
    "TwoTower",
    "build_ranker",
    "combine_scores",
    "ranker_spec",
]
