"""Tokenizer/vocabulary checks: identical tokenizers pass, padding rows are masked with a warning,
different tokenizers fail saying so and what to do; tokenizers built offline from small vocabularies."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from stillroom.errors import StillroomError
from stillroom.llm.causal import (
    CausalLM,
    build_causal_lm,
    llama_config,
    sample_continuations,
)
from stillroom.llm.corpus import SONNETS
from stillroom.llm.vocab import check_vocab, train_tokenizer
from stillroom.losses import token_distillation_loss

WORDS = [
    "shall",
    "i",
    "compare",
    "thee",
    "to",
    "a",
    "summer's",
    "day",
    "?",
    "thou",
    "art",
    "more",
    "lovely",
    "and",
    "temperate",
]


def word_level(words: list[str], pre_tokenizer=None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def test_identical_tokenizers_pass_without_a_warning() -> None:
    a, b = word_level(WORDS), word_level(WORDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        match = check_vocab(a, b, len(a), len(b))
        same_object = check_vocab(a, a, len(a), len(a))
    assert match.shared == same_object.shared == len(WORDS) + 3
    assert match.note is None


def test_padding_rows_compare_the_shared_ids_and_warn() -> None:
    tokenizer = word_level(WORDS)
    # the example: one tokenizer, embedding matrices padded to 151,936 and 152,064 rows
    with pytest.warns(UserWarning, match="padding rows; comparing the 151,936 shared ids"):
        match = check_vocab(tokenizer, tokenizer, 152_064, 151_936)
    assert (match.shared, match.teacher_rows, match.student_rows) == (151_936, 152_064, 151_936)
    assert "masking the rest" in match.note


def test_different_ids_fail_saying_so_and_the_options() -> None:
    teacher, student = word_level(WORDS), word_level(list(reversed(WORDS)))
    with pytest.raises(StillroomError) as info:
        check_vocab(teacher, student, len(teacher), len(student))
    message = str(info.value)
    assert "tokenizers differ" in message and "have other ids" in message
    assert "same model family" in message and "sequence level" in message
    assert len(message.splitlines()) == 1


def test_same_vocabulary_split_differently_fails() -> None:
    # equal token -> id maps, but one splits on whitespace only: "day?" is one (unknown) word
    teacher = word_level(WORDS)
    student = word_level(WORDS, pre_tokenizers.WhitespaceSplit())
    with pytest.raises(StillroomError, match="split the same text into other tokens"):
        check_vocab(teacher, student, len(teacher), len(student), probe="a summer's day?")


def test_bpe_tokenizers_of_other_sizes_fail() -> None:
    small, large = train_tokenizer([SONNETS], 80), train_tokenizer([SONNETS], 120)
    with pytest.raises(StillroomError, match="tokenizers differ"):
        check_vocab(small, large, 80, 120)


def test_a_head_smaller_than_the_tokenizer_fails() -> None:
    tokenizer = word_level(WORDS)
    with pytest.raises(StillroomError, match="only 10 rows"):
        check_vocab(tokenizer, tokenizer, len(tokenizer), 10)


def test_trained_tokenizer_is_deterministic_and_round_trips() -> None:
    a, b = train_tokenizer([SONNETS], 96), train_tokenizer([SONNETS], 96)
    assert a.get_vocab() == b.get_vocab() and len(a) == 96
    ids = a("Shall I compare thee\nto a summer's day?", add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == "Shall I compare thee\nto a summer's day?"
    assert (a.pad_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2)


def test_models_whose_embedding_rows_differ_are_compared_on_the_shared_ids() -> None:
    tokenizer = train_tokenizer([SONNETS], 64)
    teacher = build_causal_lm(llama_config(64, layers=1, hidden=16, heads=2), 0)
    student = build_causal_lm(llama_config(80, layers=1, hidden=16, heads=2), 1)
    with pytest.warns(UserWarning, match="padding rows"):
        match = check_vocab(tokenizer, tokenizer, 64, 80)
    with torch.no_grad():  # make the padding rows the student's favourites: they must stay unused
        student.lm_head.weight[64:] = 50.0 * student.lm_head.weight[:16].sign()
    t, s = CausalLM(teacher, match.shared), CausalLM(student, match.shared)
    ids = torch.tensor([tokenizer(SONNETS[:200], add_special_tokens=False)["input_ids"][:24]])
    student_logits = s({"input_ids": ids})
    assert student_logits.shape == (1, 24, 64) == t(ids).shape
    loss = token_distillation_loss(student_logits, t(ids).detach(), beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and student.lm_head.weight.grad is not None
    sampled = sample_continuations(
        student, ids[:, :4], 16, generator=torch.Generator().manual_seed(0), vocab_size=64
    )
    assert sampled.shape == (1, 16) and int(sampled.max()) < 64
