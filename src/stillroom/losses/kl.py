"""The one KL kernel every distribution-matching loss shares."""

from __future__ import annotations

import torch


def kl_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1, p: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(P || Q) = sum_c p_c * (log p_c - log q_c) over `dim`, from log-probabilities.

    A class outside P's support (log p = -inf: a masked class, a -inf logit, an empty top-k tail)
    adds 0 by the convention 0 * log 0 = 0; computed directly, -inf - -inf would make the sum, and
    its gradient, nan. `p`: P's probabilities when the caller holds them (attention maps), instead
    of exp(log_p).
    """
    support = log_p > float("-inf")
    log_ratio = torch.where(support, log_p - log_q, 0.0)
    return ((log_p.exp() if p is None else p) * log_ratio).sum(dim=dim)
