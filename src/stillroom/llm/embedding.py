"""Sentence embeddings: pooling, the teacher's embeddings in the store, and how far a student
agrees with its teacher.

    encoder = SentenceEncoder(load_pretrained(folder, "encoder"))    # all-MiniLM-L6-v2's recipe:
    vectors = encode(encoder, inputs)                                # masked mean, then L2 norm

Distillation fits the student's embedding to the teacher's by MSE (Reimers & Gurevych 2020,
"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation",
arXiv:2004.09813, eq. 1), the teacher's vectors computed once into a store. Agreement on held-out
sentences is measured four ways: the cosine between each student vector and its teacher vector;
the Spearman correlation between the two models' pairwise similarities (does the student rank
sentence pairs as the teacher does: what STS-style uses of the embedding see); retrieval agreement
(is the teacher's nearest neighbour of a query also the student's top-1 / in its top-k); and, when
the corpus has classes, a linear probe's accuracy on each model's embeddings (a downstream score
both can be measured on). Encode throughput is measured single-threaded at batch 32.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors, atomic_write_json
from stillroom.llm.encoder import layer_container, trim_padding
from stillroom.llm.hub import load_pretrained
from stillroom.store import StoreTeacher

# ---------------------------------------------------------------- pooling and the encoder


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the valid tokens' hidden states: (N, L, D), (N, L) -> (N, D).

    As sentence-transformers' Pooling(mean_tokens) computes it for all-MiniLM-L6-v2: padding
    contributes nothing, so a sentence's vector does not depend on how much its batch padded it."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A transformers encoder + masked mean pooling (+ a linear projection) + L2 normalisation.

    forward({"input_ids": (N, L), "attention_mask": (N, L)}) -> (N, D) unit vectors.
    out_features: add a bias-free linear map from the encoder's width to this width (a narrow
    student matched to a wider teacher, sentence-transformers' Dense module); it starts as the
    identity on the leading dims, which is what weight selection gives a narrowed encoder.
    """

    def __init__(
        self, model: nn.Module, out_features: int | None = None, normalize: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize
        width = model.config.hidden_size
        self.projection: nn.Linear | None = None
        if out_features is not None and out_features != width:
            self.projection = nn.Linear(width, out_features, bias=False)
            with torch.no_grad():
                self.projection.weight.zero_()
                size = min(width, out_features)
                self.projection.weight[:size, :size] = torch.eye(size)

    @property
    def dim(self) -> int:
        return (
            self.projection.out_features
            if self.projection is not None
            else self.model.config.hidden_size
        )

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
        vectors = mean_pool(hidden, inputs["attention_mask"])
        if self.projection is not None:
            vectors = self.projection(vectors)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def layers(self) -> str:
        """The taps pattern of its transformer layers, e.g. "model.encoder.layer.*"."""
        return f"model.{layer_container(self.model)}.*"

    def save(self, folder: Path, tokenizer: Any) -> None:
        """A sentence-transformers folder: the encoder (safetensors) and tokenizer, modules.json,
        1_Pooling (mean), 2_Dense (the projection, if any), then Normalize; it loads with
        `load_sentence_encoder` and with sentence_transformers.SentenceTransformer(folder)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER}]
        (folder / "1_Pooling").mkdir(exist_ok=True)
        pooling = {"word_embedding_dimension": self.model.config.hidden_size}
        pooling.update(POOLING_FLAGS)
        atomic_write_json(folder / "1_Pooling" / "config.json", pooling)
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING})
        if self.projection is not None:
            dense = folder / "2_Dense"
            dense.mkdir(exist_ok=True)
            atomic_write_json(
                dense / "config.json",
                {
                    "in_features": self.projection.in_features,
                    "out_features": self.projection.out_features,
                    "bias": False,
                    "activation_function": "torch.nn.modules.linear.Identity",
                },
            )
            atomic_save_tensors(
                {"linear.weight": self.projection.weight}, dense / "model.safetensors"
            )
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": DENSE})
        if self.normalize:
            index = len(modules)
            (folder / f"{index}_Normalize").mkdir(exist_ok=True)
            modules.append(
                {"idx": index, "name": str(index), "path": f"{index}_Normalize", "type": NORMALIZE}
            )
        atomic_write_json(folder / "modules.json", modules)


TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
DENSE = "sentence_transformers.models.Dense"
NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_FLAGS = {
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
}


def load_sentence_encoder(folder: Path | str) -> SentenceEncoder:
    """A sentence encoder from a local folder: a plain transformers encoder (mean pooling and
    normalisation assumed, as for all-MiniLM-L6-v2), or a sentence-transformers folder whose
    modules are Transformer, mean Pooling, optionally Dense (no bias, identity), Normalize."""
    folder = Path(folder)
    model = load_pretrained(folder, "encoder")
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return SentenceEncoder(model)
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"] for m in modules]
    unsupported = [k for k in kinds if k not in (TRANSFORMER, POOLING, DENSE, NORMALIZE)]
    if unsupported:
        raise StillroomError(f"{folder}: unsupported sentence-transformers module {unsupported[0]}")
    for module in modules:
        if module["type"] == POOLING:
            config = json.loads((folder / module["path"] / "config.json").read_text())
            if not config.get("pooling_mode_mean_tokens") or any(
                config.get(k) for k in POOLING_FLAGS if k != "pooling_mode_mean_tokens"
            ):
                raise StillroomError(f"{folder}: only mean pooling is supported")
    encoder = SentenceEncoder(model, normalize=NORMALIZE in kinds)
    dense = [m for m in modules if m["type"] == DENSE]
    if dense:
        from safetensors.torch import load_file

        path = folder / dense[0]["path"]
        config = json.loads((path / "config.json").read_text())
        if config.get("bias") or not config["activation_function"].endswith("Identity"):
            raise StillroomError(f"{path}: only a bias-free, linear Dense module is supported")
        encoder = SentenceEncoder(model, config["out_features"], encoder.normalize)
        assert encoder.projection is not None
        encoder.projection.load_state_dict(
            {"weight": load_file(str(path / "model.safetensors"))["linear.weight"]}
        )
    return encoder.eval()


@torch.inference_mode()
def encode(
    encoder: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 64
) -> torch.Tensor:
    """(N, D) float32 embeddings of tokenised (N, L) inputs, in eval mode, each batch trimmed to
    its longest sentence."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    count = len(inputs["input_ids"])
    for start in range(0, count, batch_size):
        batch = {key: value[start : start + batch_size] for key, value in inputs.items()}
        batch, _ = trim_padding(batch, torch.empty(0))
        chunks.append(encoder({k: v.to(device) for k, v in batch.items()}).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


# ---------------------------------------------------------------- teacher embeddings in the store


def pack(inputs: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """(N, 2, length) int64: input_ids (0 at padding) over attention_mask, right-padded with 0.

    The store keys a sample by a fingerprint of one tensor, and a training batch arrives trimmed
    to its own longest sentence: packing both alike to one length makes them comparable."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] > length:
        raise StillroomError(
            f"a batch of {ids.shape[1]} tokens is longer than the store's {length}"
        )
    packed = torch.stack([ids * mask, mask], dim=1).long()
    return F.pad(packed, (0, length - ids.shape[1]))


class PackedEncoder(nn.Module):
    """`encoder` called with packed (N, 2, L) inputs (see `pack`): what `cache_teacher` runs."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": packed[:, 0], "attention_mask": packed[:, 1]}
        inputs, _ = trim_padding(inputs, torch.empty(0))
        return self.encoder(inputs)


class PackedStoreTeacher:
    """A store of teacher embeddings read as the loop's teacher: (inputs dict, index) -> (N, D).

    Every batch is packed to the store's length and checked against the stored fingerprints, so
    a loader over other sentences fails instead of training on the wrong teacher vectors."""

    def __init__(self, store: Path, length: int) -> None:
        self.store = StoreTeacher(store)
        self.length = length

    def to(self, device: torch.device | str) -> PackedStoreTeacher:
        return self

    def __call__(self, inputs: dict[str, torch.Tensor], index: torch.Tensor | None) -> Any:
        return self.store(pack(inputs, self.length), index)


# ---------------------------------------------------------------- agreement with the teacher


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (scipy's method="average")."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    # start of each run of equal values, and each element's run
    new_run = torch.ones_like(sorted_values, dtype=torch.bool)
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    positions = torch.arange(1, len(values) + 1, dtype=torch.float64)
    run_sum = torch.zeros(int(run_id[-1]) + 1, dtype=torch.float64).index_add_(0, run_id, positions)
    run_len = torch.bincount(run_id).double()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = (run_sum / run_len)[run_id]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors: Pearson's r of their (average) ranks."""
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(
            f"spearman needs two 1-D tensors of one length >= 2, got {a.shape}, {b.shape}"
        )
    ra, rb = rankdata(a.double()), rankdata(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else 0.0


def pairwise_similarities(vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair i < j of (N, D) vectors: (N * (N - 1) / 2,)."""
    unit = F.normalize(vectors.double(), dim=1)
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return (unit @ unit.T)[rows, cols]


def similarity_spearman(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman correlation between the student's and the teacher's pairwise cosine similarities
    over the same (N, D_s) / (N, D_t) sentences: 1 when the student orders every pair of
    sentences as the teacher does. The widths may differ."""
    return spearman(pairwise_similarities(student), pairwise_similarities(teacher))


def cosine_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean cosine between each student vector and the teacher's for the same sentence (N, D)."""
    return F.cosine_similarity(student.double(), teacher.double(), dim=1).mean().item()


def retrieval_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> dict:
    """Does the student retrieve what the teacher retrieves? Every sentence queries the others.

    top1: share of queries whose nearest neighbour (cosine, itself excluded) is the teacher's;
    recall@k: share of queries whose teacher nearest neighbour is among the student's k nearest.
    """
    n = len(student)
    if n < 2:
        raise ValueError("retrieval agreement needs at least 2 sentences")
    k = min(k, n - 1)

    def scores(vectors: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(vectors.double(), dim=1)
        sims = unit @ unit.T
        return sims.fill_diagonal_(-float("inf"))

    teacher_best = scores(teacher).argmax(1)
    student_top = scores(student).topk(k, dim=1).indices
    return {
        "top1": (student_top[:, 0] == teacher_best).double().mean().item(),
        f"recall@{k}": (student_top == teacher_best[:, None]).any(1).double().mean().item(),
    }


def probe_accuracy(
    train: torch.Tensor, train_labels: list[int], test: torch.Tensor, test_labels: list[int]
) -> float:
    """Accuracy of a logistic-regression probe fitted on `train` embeddings, on `test` ones: a
    downstream score of the embedding itself (SentEval's protocol, Conneau & Kiela 2018)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, C=10.0)
    probe.fit(train.double().numpy(), train_labels)
    return float(probe.score(test.double().numpy(), test_labels))


def agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Every agreement metric of (N, D_s) student and (N, D_t) teacher embeddings."""
    metrics = {"similarity_spearman": similarity_spearman(student, teacher)}
    if student.shape == teacher.shape:
        metrics["cosine"] = cosine_agreement(student, teacher)
    metrics.update(retrieval_agreement(student, teacher, k))
    return metrics


def throughput(
    encoder: nn.Module,
    inputs: dict[str, torch.Tensor],
    batch_size: int = 32,
    repeats: int = 5,
    threads: int | None = 1,
) -> float:
    """Sentences per second encoding `inputs` on the CPU at `batch_size` (median of `repeats`
    passes, after one warm-up pass), with torch limited to `threads` (None: unchanged)."""
    previous = torch.get_num_threads()
    # a CPU copy: the caller's model stays where it is (and in its training mode)
    encoder = copy.deepcopy(encoder).cpu().eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        encode(encoder, inputs, batch_size)
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            encode(encoder, inputs, batch_size)
            rates.append(len(inputs["input_ids"]) / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(previous)
    return statistics.median(rates)
