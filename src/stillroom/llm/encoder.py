"""Encoder compression, DistilBERT-style: a student made of some of the teacher's layers.

    student = reduce_layers(teacher, keep=[0, 2, 4])     # every other layer of a 6-layer encoder

DistilBERT (Sanh et al. 2019, arXiv:1910.01108, sec. 3) halves BERT's depth and initialises the
student "from the teacher by taking one layer out of two"; the embeddings and heads are copied as
they are. `reduce_layers` does that for any transformers encoder whose layers sit in one
`ModuleList` (BERT, RoBERTa, DistilBERT, MiniLM, ...), whatever its head (bare encoder, sequence
classification, masked LM), and can narrow the width too: every tensor is then initialised with the
teacher's leading rows and columns ("weight selection", Xu et al. 2024, arXiv:2311.18823), whole
attention heads kept.

Also here: a model wrapper that takes the tokenised inputs dict the loop passes and returns one
tensor (`TextModel`), tiny BERT configs and a WordPiece tokenizer trained offline (tests and CI
need no download), tokenisation that refuses sequences longer than the model's positions, and
loaders over tokenised text (dynamic padding, BERT's MLM masking).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stillroom.errors import StillroomError
from stillroom.llm.hub import transformers_module
from stillroom.losses import IGNORE_INDEX

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ---------------------------------------------------------------- layer reduction


def layer_container(model: nn.Module) -> str:
    """The name of the `ModuleList` that holds the transformer layers, e.g. "bert.encoder.layer".

    Found as the one ModuleList named `layer`/`layers` with `config.num_hidden_layers` entries."""
    count = model.config.num_hidden_layers
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and name.rsplit(".", 1)[-1] in ("layer", "layers")
    ]
    if len(found) != 1:
        raise StillroomError(
            f"{type(model).__name__}: cannot tell which module holds its {count} transformer "
            f"layers (candidates: {found or 'none'}); layer reduction needs one ModuleList "
            "named 'layer' or 'layers'"
        )
    return found[0]


def check_keep(keep: list[int] | None, num_layers: int) -> list[int]:
    """The kept layer indices: default every other layer (0, 2, 4, ...); refuses an empty list,
    repeats, a decreasing order and indices outside 0..num_layers-1."""
    if keep is None:
        return list(range(0, num_layers, 2))
    keep = list(keep)
    if not keep:
        raise StillroomError("keep must name at least one teacher layer")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise StillroomError(
            f"keep layer {bad[0]} is out of range: the teacher has {num_layers} layers "
            f"(0..{num_layers - 1})"
        )
    if any(b <= a for a, b in pairwise(keep)):
        raise StillroomError(f"keep must list distinct layers in increasing order, got {keep}")
    return keep


def reduce_layers(
    teacher: nn.Module,
    keep: list[int] | None = None,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A student of the teacher's class and config with `len(keep)` layers, initialised from them.

    Args:
        teacher: a transformers model (BertModel, BertForSequenceClassification, BertForMaskedLM,
            ...); left unchanged.
        keep: teacher layer indices; student layer j starts as teacher layer keep[j]. Default:
            every other layer, 0, 2, 4, ... (DistilBERT).
        hidden_size: a narrower width (a multiple of the head size, at most the teacher's): the
            student keeps hidden_size / head_size attention heads, and every tensor starts as the
            teacher tensor's leading slice (weight selection). None keeps the teacher's width.
        intermediate_size: the feed-forward width (default: scaled like the hidden size).

    Returns:
        the student, in eval mode. Embeddings, pooler and heads are copies of the teacher's
        (sliced when narrower); student layer j is a copy of teacher layer keep[j].
    """
    config = copy.deepcopy(teacher.config)
    container = layer_container(teacher)
    keep = check_keep(keep, config.num_hidden_layers)
    config.num_hidden_layers = len(keep)
    if hidden_size is not None and hidden_size != config.hidden_size:
        head_size = config.hidden_size // config.num_attention_heads
        if not 0 < hidden_size <= config.hidden_size or hidden_size % head_size:
            raise StillroomError(
                f"hidden_size {hidden_size} must be a multiple of the teacher's head size "
                f"{head_size} and at most its width {config.hidden_size}"
            )
        scale = hidden_size / config.hidden_size
        config.intermediate_size = intermediate_size or round(config.intermediate_size * scale)
        config.num_attention_heads = hidden_size // head_size
        config.hidden_size = hidden_size
    elif intermediate_size is not None:
        config.intermediate_size = intermediate_size
    student = type(teacher)(config)
    source = teacher.state_dict()
    layer_key = re.compile(rf"{re.escape(container)}\.(\d+)\.(.+)")
    state = {}
    for key, target in student.state_dict().items():
        match = layer_key.fullmatch(key)
        name = f"{container}.{keep[int(match[1])]}.{match[2]}" if match else key
        tensor = source[name]
        if tensor.shape != target.shape:  # a narrower student: the leading slice of every dim
            tensor = tensor[tuple(slice(0, size) for size in target.shape)]
        state[key] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    return student.eval()


class TextModel(nn.Module):
    """A transformers model called with the tokenised inputs dict, returning one output tensor.

    forward({"input_ids": (N, L), "attention_mask": (N, L), ...}) -> `output` of the model's
    result: "logits" ((N, C) for sequence classification, (N, L, V) for a masked LM) or
    "last_hidden_state" ((N, L, D) for a bare encoder). The loop and the taps see this wrapper:
    its layers are named "model.<layer_container(model)>.<i>".
    """

    def __init__(self, model: nn.Module, output: str = "logits") -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return getattr(self.model(**inputs), self.output)

    def layers(self) -> str:
        """The taps pattern of its transformer layers, e.g. "model.bert.encoder.layer.*"."""
        return f"model.{layer_container(self.model)}.*"


# ---------------------------------------------------------------- tiny models and tokenizers


@dataclass(frozen=True)
class TinyConfig:
    """A small BERT built from a config (no download): tests, CI, quick experiments."""

    layers: int = 4
    hidden: int = 32
    heads: int = 2
    intermediate: int = 64
    vocab_size: int = 2000
    max_positions: int = 128
    init_std: float = 0.02  # BERT's initializer_range


def tiny_bert(config: TinyConfig, kind: str, vocab_size: int, num_labels: int = 2) -> nn.Module:
    """A randomly initialised BERT of `kind` ("encoder", "masked_lm", "sequence_classification")
    sized by `config`, for a tokenizer of `vocab_size` entries (pad id 0). Seed torch first."""
    transformers = transformers_module()
    bert = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate,
        max_position_embeddings=config.max_positions,
        num_labels=num_labels,
        pad_token_id=0,
        initializer_range=config.init_std,
    )
    classes = {
        "encoder": transformers.BertModel,
        "masked_lm": transformers.BertForMaskedLM,
        "sequence_classification": transformers.BertForSequenceClassification,
    }
    return classes[kind](bert).eval()


def train_wordpiece(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """A lower-casing BERT WordPiece tokenizer trained offline on `texts` (the `tokenizers`
    library), as a transformers fast tokenizer ([PAD] = 0, [CLS] text [SEP])."""
    transformers = transformers_module()
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    if not texts:
        raise StillroomError("cannot train a tokenizer on an empty corpus")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings cover (RoBERTa-style models reserve
    pad_token_id + 1 positions for padding)."""
    config = model.config
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    return config.max_position_embeddings - offset


def tokenize(
    tokenizer: Any, texts: list[str], max_length: int, model: nn.Module
) -> tuple[dict[str, torch.Tensor], int]:
    """Tokenise `texts` to (N, L) input_ids / attention_mask (L = the longest, at most
    max_length), truncating longer texts. Returns (inputs, number of texts truncated).

    Raises StillroomError when max_length exceeds what the model's positions cover, or for no
    texts: a longer sequence would index past the position embeddings."""
    limit = max_positions(model)
    if max_length > limit:
        raise StillroomError(
            f"max_length {max_length} is longer than the model's maximum of {limit} positions "
            f"(max_position_embeddings); use max_length <= {limit}"
        )
    if not texts:
        raise StillroomError("no texts to tokenise: the corpus split is empty")
    # verbose=False: this pass only counts lengths, longer ones are expected and truncated below
    lengths = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in lengths)
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    inputs = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }
    return inputs, truncated


# ---------------------------------------------------------------- loaders over tokenised text


class TokenDataset(Dataset):
    """(inputs row dict, target, index) over tokenised text held in memory.

    inputs: {"input_ids": (N, L), "attention_mask": (N, L)}; targets: (N,) class ids, (N, D)
    reference vectors, (N, L) token labels, or None (an MLM collate makes the labels)."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor | None) -> None:
        self.inputs = inputs
        self.targets = targets
        self.size = len(inputs["input_ids"])
        assert targets is None or len(targets) == self.size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        row = {key: value[i] for key, value in self.inputs.items()}
        target = self.targets[i] if self.targets is not None else torch.tensor(IGNORE_INDEX)
        return row, target, i


def trim_padding(
    inputs: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Cut the columns that are padding in every row of the batch (dynamic padding: a batch of
    short sentences costs short sentences). (N, L) token labels are cut alike."""
    length = max(int(inputs["attention_mask"].sum(1).max()), 1)
    inputs = {key: value[:, :length] for key, value in inputs.items()}
    if targets.dim() == 2 and targets.dtype == torch.long:
        targets = targets[:, :length]
    return inputs, targets


def collate(batch: list[tuple[dict[str, torch.Tensor], torch.Tensor, int]]) -> tuple:
    """Stack rows and trim the padding: ((N, L) inputs dict, targets, (N,) index)."""
    inputs = {key: torch.stack([row[0][key] for row in batch]) for key in batch[0][0]}
    targets = torch.stack([row[1] for row in batch])
    index = torch.tensor([row[2] for row in batch])
    inputs, targets = trim_padding(inputs, targets)
    return inputs, targets, index


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, arXiv:1810.04805, sec. 3.1): each real,
    non-special token is chosen with `probability`; of those 80% become [MASK], 10% a random
    token, 10% stay. Returns (corrupted input_ids (N, L), labels (N, L): the original id where
    chosen, IGNORE_INDEX elsewhere)."""
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = eligible & (draw < probability)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    how = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    corrupted = torch.where(chosen & (how < 0.8), mask_id, input_ids)
    corrupted = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, corrupted)
    return corrupted, labels


class MLMCollate:
    """`collate` plus fresh MLM masking of every training batch, drawn from torch's global RNG
    (which the loop re-seeds per epoch, so a resumed run masks alike)."""

    def __init__(self, tokenizer: Any, probability: float) -> None:
        self.special_ids = list(tokenizer.all_special_ids)
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.probability = probability

    def __call__(self, batch: list) -> tuple:
        inputs, _, index = collate(batch)
        ids, labels = mask_tokens(
            inputs["input_ids"],
            inputs["attention_mask"],
            self.special_ids,
            self.mask_id,
            self.vocab_size,
            self.probability,
        )
        return {**inputs, "input_ids": ids}, labels, index


def masked_once(
    inputs: dict[str, torch.Tensor], tokenizer: Any, probability: float, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A fixed MLM corruption of held-out text (seeded), so every evaluation scores the same
    masked positions: (corrupted inputs, (N, L) labels)."""
    ids, labels = mask_tokens(
        inputs["input_ids"],
        inputs["attention_mask"],
        list(tokenizer.all_special_ids),
        tokenizer.mask_token_id,
        len(tokenizer),
        probability,
        torch.Generator().manual_seed(seed),
    )
    return {**inputs, "input_ids": ids}, labels


def text_loader(
    inputs: dict[str, torch.Tensor],
    targets: torch.Tensor | None,
    batch_size: int,
    shuffle: bool,
    collate_fn: Any = collate,
) -> DataLoader:
    """A loader of (inputs dict, targets, index) batches with dynamic padding."""
    return DataLoader(
        TokenDataset(inputs, targets),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
    )
