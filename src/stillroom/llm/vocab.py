"""Tokenizer and vocabulary checks for token-level distillation, and small tokenizers trained offline.

Token-level distillation compares the teacher's and the student's next-token distributions id by
id, so both must read the same text as the same ids. `check_vocab` runs at setup, before anything
trains:

- identical tokenizers pass;
- the same tokenizer with embedding matrices of different row counts (e.g. 151,936 vs 152,064: a
  vocabulary padded to a rounder size for faster matrix multiplies) passes with a warning: the
  logits are sliced to the ids both models have, and the rows beyond are masked (never compared,
  never sampled);
- different tokenizers fail with a message saying so and what the options are (the same tokenizer
  family, or sequence-level distillation on teacher-generated text, which needs no shared
  vocabulary; cross-tokenizer token-level methods such as ULD, arXiv:2402.12030, are not built in).

`train_tokenizer` builds a small BPE tokenizer from text with the `tokenizers` library, offline: the
tokenizer of the tiny teachers in tests and `recipes/tiny_causal.yaml`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stillroom.errors import StillroomError
from stillroom.llm.hub import transformers_module

PROBE_TEXT = "Shall I compare thee to a summer's day? 1234 + 0.5 = x_y; naïve café, ü, 東京\n\tEnd."
"""Encoded by both tokenizers: equal vocabularies with other merges or normalisers still differ."""

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


@dataclass(frozen=True)
class VocabMatch:
    """The outcome of `check_vocab`.

    shared: the ids [0, shared) both models score; logits are sliced to it on both sides.
    tokens: the tokenizer's size (ids it can produce are below it).
    teacher_rows, student_rows: the LM heads' output rows.
    note: the warning given when the rows differ (None when everything matches).
    """

    shared: int
    tokens: int
    teacher_rows: int
    student_rows: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "shared_ids": self.shared,
            "tokenizer_size": self.tokens,
            "teacher_rows": self.teacher_rows,
            "student_rows": self.student_rows,
            "note": self.note,
        }


OPTIONS = (
    "use a student with the teacher's tokenizer (build it from the teacher's config, or pick "
    "one of the same model family), or distil at the sequence level: fine-tune the student on "
    "text the teacher generates, which needs no shared vocabulary"
)


def _different(detail: str) -> StillroomError:
    return StillroomError(
        f"the teacher's and the student's tokenizers differ ({detail}); token-level distillation "
        f"compares the two next-token distributions id by id. Options: {OPTIONS}"
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_vocab(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    teacher_rows: int,
    student_rows: int,
    *,
    probe: str = PROBE_TEXT,
) -> VocabMatch:
    """Check that teacher and student read text as the same ids; size the shared vocabulary.

    Args:
        teacher_tokenizer, student_tokenizer: Hugging Face tokenizers (get_vocab, __call__).
        teacher_rows, student_rows: output rows of each LM head (config.vocab_size).
        probe: text both must encode alike (add a sample of the corpus: it is what they will read).

    Returns:
        VocabMatch; warns (UserWarning) when the rows differ and only the shared ids are compared.

    Raises:
        StillroomError: the tokenizers map tokens to other ids, encode the probe differently, or a
        token id has no row in one of the models.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_tokenizer is not student_tokenizer:
        if teacher_vocab != student_vocab:
            common = teacher_vocab.keys() & student_vocab.keys()
            moved = sorted(t for t in common if teacher_vocab[t] != student_vocab[t])
            only = len(teacher_vocab.keys() ^ student_vocab.keys())
            example = (
                f", e.g. {moved[0]!r} is id {teacher_vocab[moved[0]]} vs {student_vocab[moved[0]]}"
                if moved
                else ""
            )
            raise _different(
                f"{len(teacher_vocab):,} vs {len(student_vocab):,} tokens; {len(moved):,} shared "
                f"tokens have other ids{example}; {only:,} tokens are in one only"
            )
        if _encode(teacher_tokenizer, probe) != _encode(student_tokenizer, probe):
            raise _different(
                "same vocabulary, but they split the same text into other tokens (other merges, "
                "normaliser or pre-tokenizer)"
            )
    tokens = max(teacher_vocab.values()) + 1
    shared = min(teacher_rows, student_rows)
    if tokens > shared:
        short = "teacher" if teacher_rows < student_rows else "student"
        raise StillroomError(
            f"the tokenizer has {tokens:,} ids but the {short}'s LM head only {shared:,} rows: "
            f"those tokens cannot be scored; the {short} was built for another tokenizer. "
            f"Options: {OPTIONS}"
        )
    note = None
    if teacher_rows != student_rows:
        note = (
            f"the teacher's LM head has {teacher_rows:,} rows and the student's {student_rows:,} "
            f"for one tokenizer of {tokens:,} ids: padding rows; comparing the {shared:,} shared "
            f"ids and masking the rest"
        )
        warnings.warn(note, UserWarning, stacklevel=2)
    return VocabMatch(shared, tokens, teacher_rows, student_rows, note)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-free BPE tokenizer trained on `texts`, as a transformers fast tokenizer.

    Characters seen in the text form the base alphabet (unseen ones map to <unk>); spaces become
    "▁" (Metaspace) so decoding restores them. Special tokens: <pad> (0), <eos> (1), <unk> (2).
    Deterministic for the same texts and size. Small on purpose: tests and tiny recipes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise StillroomError(
            f"tokenizer vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=1 << 30,
    )
