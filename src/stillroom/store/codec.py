"""How top-k soft targets are laid out on disk: value and index encodings, and their fidelity.

Per position a top-k store keeps three fixed-size fields, so any position can be read on its own:

    topk_logprobs   k teacher log-probabilities (T = 1): fp32, fp16, or q8 (one byte each, a uniform
                    grid on [LOGPROB_FLOOR, 0] in log space, code 0 = -inf)
    topk_indices    their k class ids: "plain" in the narrowest integer type that holds the
                    vocabulary (uint8 / uint16 / int32), or "elias-fano": the ids sorted and packed
                    with Elias-Fano coding (Elias 1974, Fano 1971), k * (2 + log2(V / k)) bits at most
    topk_tail       log of the probability mass outside the k classes (fp32, or fp16 otherwise):
                    the log keeps tiny tails (1e-12) that fp16 would flush to 0

Everything here is numpy on (M, k) arrays (M positions), the layout of one store field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stillroom.losses.topk import TopKTargets, topk_targets_from_logits

VALUE_ENCODINGS = ("fp32", "fp16", "q8")
INDEX_ENCODINGS = ("plain", "elias-fano")
LOGPROB_FLOOR = -20.0
"""q8 grid bottom: probabilities below e^-20 (2e-9) are stored as e^-20; they carry no weight."""
_Q8_STEPS = (
    254  # codes 1..255 span the grid; 0 is reserved for -inf (a class the teacher rules out)
)


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest integer type holding every class id in [0, num_classes)."""
    if num_classes <= 2**8:
        return np.dtype(np.uint8)
    if num_classes <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True)
class EliasFanoLayout:
    """Fixed-size Elias-Fano code of k distinct sorted ids in [0, universe).

    Each id x splits into `low_bits` low bits (stored verbatim) and the high part x >> low_bits,
    stored in unary as a bit vector with a 1 at position high_i + i. Both parts have a fixed length,
    so every position takes the same `num_bytes` and can be read alone.
    """

    universe: int
    k: int

    @property
    def low_bits(self) -> int:
        return max(0, (self.universe // self.k).bit_length() - 1)

    @property
    def high_bits(self) -> int:
        return ((self.universe - 1) >> self.low_bits) + self.k

    @property
    def low_bytes(self) -> int:
        return math.ceil(self.k * self.low_bits / 8)

    @property
    def num_bytes(self) -> int:
        return self.low_bytes + math.ceil(self.high_bits / 8)


def elias_fano_encode(ids: np.ndarray, layout: EliasFanoLayout) -> np.ndarray:
    """(M, k) distinct ids sorted ascending per row -> (M, num_bytes) uint8."""
    ids = ids.astype(np.int64, copy=False)
    assert ids.ndim == 2 and ids.shape[1] == layout.k
    m, k, low = ids.shape[0], layout.k, layout.low_bits
    low_part = ids & ((1 << low) - 1)
    low_bitmat = ((low_part[:, :, None] >> np.arange(low)) & 1).astype(np.uint8)
    low_packed = np.packbits(low_bitmat.reshape(m, k * low), axis=1, bitorder="little")
    high_bitmat = np.zeros((m, layout.high_bits), dtype=np.uint8)
    high_bitmat[np.arange(m)[:, None], (ids >> low) + np.arange(k)] = 1
    high_packed = np.packbits(high_bitmat, axis=1, bitorder="little")
    return np.concatenate([low_packed.reshape(m, layout.low_bytes), high_packed], axis=1)


def elias_fano_decode(packed: np.ndarray, layout: EliasFanoLayout) -> np.ndarray:
    """(M, num_bytes) uint8 -> (M, k) int64 ids, ascending per row."""
    m, k, low = packed.shape[0], layout.k, layout.low_bits
    low_bitmat = np.unpackbits(
        packed[:, : layout.low_bytes], axis=1, count=k * low, bitorder="little"
    )
    low_part = (low_bitmat.reshape(m, k, low).astype(np.int64) << np.arange(low)).sum(axis=2)
    high_bitmat = np.unpackbits(
        packed[:, layout.low_bytes :], axis=1, count=layout.high_bits, bitorder="little"
    )
    _, positions = np.nonzero(high_bitmat)
    # a checksum-verified shard always has k ones per row; anything else is a codec bug
    assert len(positions) == m * k, "Elias-Fano block does not hold k ids per position"
    high = positions.reshape(m, k) - np.arange(k)
    return (high << low) | low_part


def encode_logprobs(logprobs: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "fp32":
        return logprobs.astype(np.float32)
    if encoding == "fp16":
        return logprobs.astype(np.float16)
    assert encoding == "q8", encoding
    steps = np.rint(np.clip(logprobs, LOGPROB_FLOOR, 0.0) / LOGPROB_FLOOR * _Q8_STEPS)
    codes = (_Q8_STEPS + 1 - steps).astype(np.uint8)
    return np.where(np.isneginf(logprobs), np.uint8(0), codes)


def decode_logprobs(stored: np.ndarray, encoding: str) -> np.ndarray:
    if encoding != "q8":
        return stored.astype(np.float32)
    values = (_Q8_STEPS + 1 - stored.astype(np.float32)) * (LOGPROB_FLOOR / _Q8_STEPS)
    return np.where(stored == 0, np.float32(-np.inf), values).astype(np.float32)


@dataclass(frozen=True)
class TopKCodec:
    """Encodes (M, k) top-k log-probs, ids and tails into the three store fields, and back."""

    num_classes: int
    k: int
    values: str = "fp16"
    indices: str = "plain"

    def __post_init__(self) -> None:
        if self.values not in VALUE_ENCODINGS:
            raise ValueError(f"top-k values must be one of {VALUE_ENCODINGS}, got {self.values!r}")
        if self.indices not in INDEX_ENCODINGS:
            raise ValueError(
                f"top-k indices must be one of {INDEX_ENCODINGS}, got {self.indices!r}"
            )
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"k must be in [1, {self.num_classes}], got {self.k}")

    @property
    def layout(self) -> EliasFanoLayout:
        return EliasFanoLayout(self.num_classes, self.k)

    def fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Per-position dtype and trailing shape of each stored field."""
        value_dtype = {"fp32": np.float32, "fp16": np.float16, "q8": np.uint8}[self.values]
        if self.indices == "plain":
            ids = (index_dtype(self.num_classes), (self.k,))
        else:
            ids = (np.dtype(np.uint8), (self.layout.num_bytes,))
        tail = np.float32 if self.values == "fp32" else np.float16
        return {
            "topk_logprobs": (np.dtype(value_dtype), (self.k,)),
            "topk_indices": ids,
            "topk_tail": (np.dtype(tail), ()),
        }

    @property
    def bytes_per_position(self) -> int:
        return sum(dtype.itemsize * math.prod(shape) for dtype, shape in self.fields().values())

    def encode(
        self, logprobs: np.ndarray, ids: np.ndarray, tail_mass: np.ndarray
    ) -> dict[str, np.ndarray]:
        """(M, k) log-probs, (M, k) ids, (M,) tail masses -> the stored fields."""
        if self.indices == "elias-fano":
            # Elias-Fano needs ascending ids; the values follow their ids
            order = np.argsort(ids, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            logprobs = np.take_along_axis(logprobs, order, axis=1)
            stored_ids = elias_fano_encode(ids, self.layout)
        else:
            stored_ids = ids.astype(index_dtype(self.num_classes))
        with np.errstate(divide="ignore"):  # log(0) = -inf: a teacher with nothing outside top-k
            log_tail = np.log(np.clip(tail_mass, 0.0, 1.0))
        tail_dtype = self.fields()["topk_tail"][0]
        return {
            "topk_logprobs": encode_logprobs(logprobs, self.values),
            "topk_indices": stored_ids,
            "topk_tail": log_tail.astype(tail_dtype),
        }

    def decode(self, stored: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored fields of M positions -> (M, k) float32 log-probs, (M, k) int64 ids, (M,) tails."""
        if self.indices == "elias-fano":
            ids = elias_fano_decode(stored["topk_indices"], self.layout)
        else:
            ids = stored["topk_indices"].astype(np.int64)
        tail = np.exp(stored["topk_tail"].astype(np.float32))
        return decode_logprobs(stored["topk_logprobs"], self.values), ids, tail


def _flat_topk(targets: TopKTargets, class_dim: int) -> tuple[np.ndarray, ...]:
    """TopKTargets with k on `class_dim` -> numpy (M, k), (M, k), (M,)."""
    k = targets.indices.shape[class_dim]
    logprobs = targets.logprobs.movedim(class_dim, -1).reshape(-1, k)
    ids = targets.indices.movedim(class_dim, -1).reshape(-1, k)
    return logprobs.cpu().numpy(), ids.cpu().numpy(), targets.tail_mass.reshape(-1).cpu().numpy()


def encode_topk(logits: torch.Tensor, codec: TopKCodec, class_dim: int) -> dict[str, np.ndarray]:
    """Teacher logits (N, ..., V, ...) -> stored fields shaped (N, *positions, field shape)."""
    targets = topk_targets_from_logits(logits, codec.k, class_dim)
    positions = list(targets.tail_mass.shape)
    encoded = codec.encode(*_flat_topk(targets, class_dim))
    return {name: array.reshape(*positions, *array.shape[1:]) for name, array in encoded.items()}


def reconstruction_kl(
    logits: torch.Tensor, codec: TopKCodec, class_dim: int = -1, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(full || reconstruction) and the true tail mass, both float64 (M,).

    The reconstruction is what the store can give back: the decoded top-k probabilities at their
    ids and the decoded tail mass spread evenly over the other V - k classes, renormalised (q8
    values do not sum exactly). KL = sum_i p_i (log p_i - log q_i), in float64, `chunk` positions
    at a time (memory: a few chunk * V float64 blocks).
    """
    vocab = logits.shape[class_dim]
    flat = logits.detach().movedim(class_dim, -1).reshape(-1, vocab)
    kls, tails = [], []
    for start in range(0, flat.shape[0], chunk):
        kl, tail = _reconstruction_kl(flat[start : start + chunk], codec)
        kls.append(kl)
        tails.append(tail)
    return torch.cat(kls), torch.cat(tails)


def _reconstruction_kl(logits: torch.Tensor, codec: TopKCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, V) logits -> (M,) KL and (M,) true tail mass; see `reconstruction_kl`."""
    vocab = logits.shape[1]
    log_p = torch.log_softmax(logits.double(), dim=1)
    targets = topk_targets_from_logits(log_p, codec.k, class_dim=-1)
    logprobs, ids, tail = codec.decode(codec.encode(*_flat_topk(targets, -1)))
    q_top = torch.from_numpy(logprobs).double()
    q_rest = torch.from_numpy(tail).double()
    log_norm = torch.logaddexp(torch.logsumexp(q_top, dim=1), q_rest.log())
    p_top = log_p.gather(1, torch.from_numpy(ids)).exp()
    # 0 * log 0 = 0: classes the teacher rules out (-inf logits) add nothing
    neg_entropy = torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(dim=1)
    cross_top = torch.where(p_top > 0, p_top * (q_top - log_norm[:, None]), 0.0).sum(dim=1)
    true_tail = (1.0 - p_top.sum(dim=1)).clamp_min(0.0)
    if codec.k < vocab:
        log_q_each_rest = q_rest.log() - math.log(vocab - codec.k) - log_norm
        cross_rest = torch.where(true_tail > 0, true_tail * log_q_each_rest, 0.0)
    else:
        cross_rest = torch.zeros_like(true_tail)
    return (neg_entropy - cross_top - cross_rest).clamp_min(0.0), true_tail


def topk_fidelity(
    logits: torch.Tensor,
    ks: list[int],
    class_dim: int = -1,
    values: str = "fp16",
    indices: str = "plain",
    chunk: int = 256,
) -> list[dict[str, float]]:
    """Bytes per position and KL(full || top-k reconstruction) for each k, over every position.

    Args:
        logits: teacher logits, e.g. (N, L, V) with class_dim=-1, or (N, C) with class_dim=1.
        ks: the k values to compare.
        values, indices: the encodings, as `TopKCodec`.
        chunk: positions per float64 block (memory: chunk * V * 8 bytes a few times over).

    Returns:
        one dict per k: k, bytes_per_position, kl_mean, kl_p99, kl_max, tail_mass_mean.
    """
    rows = []
    for k in ks:
        codec = TopKCodec(logits.shape[class_dim], k, values, indices)
        kl_all, tail_all = reconstruction_kl(logits, codec, class_dim, chunk)
        rows.append(
            {
                "k": k,
                "bytes_per_position": codec.bytes_per_position,
                "kl_mean": kl_all.mean().item(),
                "kl_p99": kl_all.quantile(0.99).item() if len(kl_all) > 1 else kl_all.max().item(),
                "kl_max": kl_all.max().item(),
                "tail_mass_mean": tail_all.mean().item(),
            }
        )
    return rows
