"""`method: sentence_embedding`: a sentence encoder distilled into a few of its own layers.

    teacher (all-MiniLM-L6-v2 from its package, any local encoder folder, or a tiny BERT)
      -> its embeddings of the training sentences, once, into a store (teacher_store/)
      -> student = reduce_layers(teacher, keep), optionally narrower with a projection
      -> MSE(student(x), teacher(x)) through stillroom.train.distill (Reimers & Gurevych 2020,
         arXiv:2004.09813), plus optional hidden-state cosine on the kept layers (live teacher)
      -> held-out sentences (documents the student never saw): agreement with the teacher,
         linear-probe accuracy (when the corpus has classes), encode throughput (1 thread)

The baseline without a teacher is the same reduced student as initialised, untrained: an embedding
has no labels to train it on without a teacher, and the truncated model is what layer dropping
gives before distillation. Sentences longer than data.max_length tokens are truncated (counted in
results.json); a max_length past the model's positions is refused.

Run folder:
    config.yaml                         the resolved recipe
    teacher_store/                      the teacher's embeddings of the training sentences
    teacher_embeddings.safetensors      ... of the validation and test sentences
    student/                            a sentence-transformers folder (safetensors, tokenizer,
                                        pooling, normalize) + the loop's files; done.json last
    results.json, results.md            teacher, truncated and distilled students
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file

from stillroom.config import RecipeBase, TrainSection
from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors, atomic_write_json
from stillroom.llm.embedding import (
    PackedEncoder,
    PackedStoreTeacher,
    SentenceEncoder,
    agreement,
    encode,
    load_sentence_encoder,
    pack,
    probe_accuracy,
    throughput,
)
from stillroom.llm.encoder import reduce_layers, text_loader, tokenize
from stillroom.llm.hub import load_tokenizer
from stillroom.llm.sentences import SentenceCorpus, load_corpus, split_documents
from stillroom.measure import weights_bytes
from stillroom.methods.encoder import (
    ReducedStudentSection,
    TextSourceSection,
    TextTeacherSection,
    _Section,
    load_text_teacher,
    protected_paths,
    resolve_model_path,
    train_args,
)
from stillroom.objective import TermSpec
from stillroom.results import ModelResult, Summary, write_summary
from stillroom.runs import check_run_dir_free, is_complete, mark_complete, prepare_run_dir
from stillroom.store import cache_teacher
from stillroom.train import distill


class EmbeddingDataSection(TextSourceSection):
    """The text (source, path, text, label, split: as for method encoder) and how much of it."""

    max_documents: int | None = Field(None, ge=2, description="a random subset (quick runs)")
    min_words: int = Field(4, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="documents held out for the table")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="documents for the best checkpoint")
    split_seed: int = Field(0, description="seed of the split and the samples (fixed across seeds)")
    train_sentences: int | None = Field(
        4096, ge=1, description="training sentences drawn from the training documents (null: all)"
    )
    val_sentences: int = Field(256, ge=2)
    test_sentences: int = Field(512, ge=2)
    probe_sentences: int = Field(
        1024, ge=0, description="training sentences a linear probe is fitted on (0: no probe)"
    )
    max_length: int = Field(
        64, ge=4, description="tokens per sentence; longer sentences are truncated (counted)"
    )
    batch_size: int = Field(32, ge=1)


class EmbeddingDistillSection(TrainSection):
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    mse_weight: float = Field(1.0, ge=0, description="MSE to the teacher's embedding (the store)")
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="1 - cosine between each student layer and its kept teacher layer (runs the "
        "teacher live at every step instead of reading the store)",
    )
    freeze_word_embeddings: bool = Field(
        False,
        description="keep the token embedding table fixed (half of MiniLM's parameters: a cheaper "
        "step and optimizer state)",
    )


class EvalSection(_Section):
    k: int = Field(10, ge=1, description="retrieval agreement: recall@k of the teacher's top-1")
    throughput_sentences: int = Field(256, ge=1, description="test sentences timed")
    throughput_repeats: int = Field(5, ge=1, description="timed passes; the median is reported")


class SentenceEmbeddingRecipe(RecipeBase):
    """Sentence-embedding distillation into a layer-reduced student (method: sentence_embedding)."""

    method: Literal["sentence_embedding"] = "sentence_embedding"
    name: str = "sentence_embedding"
    teacher: TextTeacherSection
    student: ReducedStudentSection = ReducedStudentSection()
    data: EmbeddingDataSection = EmbeddingDataSection()
    distill: EmbeddingDistillSection = EmbeddingDistillSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _checks(self) -> SentenceEmbeddingRecipe:
        if self.teacher.train is not None:
            raise ValueError("teacher.train: a sentence-embedding teacher is used as it is")
        if self.distill.mse_weight + self.distill.hidden_weight <= 0:
            raise ValueError("distill: give mse_weight or hidden_weight > 0")
        return self


@dataclass
class Prepared:
    """Everything a student run needs, built once (the benchmark trains many students on it)."""

    teacher: SentenceEncoder
    tokenizer: Any
    inputs: dict[str, dict[str, torch.Tensor]]  # split -> tokenised (N, L) inputs
    corpora: dict[str, SentenceCorpus]
    truncated: int


def _sample(corpus: SentenceCorpus, count: int | None, seed: int) -> SentenceCorpus:
    if count is None or count >= len(corpus):
        return corpus
    return corpus.subset(sorted(random.Random(seed).sample(range(len(corpus)), count)))


def prepare(recipe: SentenceEmbeddingRecipe) -> Prepared:
    """Corpus -> document split -> sentence samples -> teacher and tokenizer -> tokenised splits.
    Every user mistake fails here, before any folder is written."""
    d = recipe.data
    corpus = load_corpus(
        d.source,
        path=d.path,
        text=d.text,
        label=d.label,
        split=d.split,
        min_words=d.min_words,
        max_documents=d.max_documents,
        seed=d.split_seed,
    )
    rest, test = split_documents(corpus, d.test_fraction, d.split_seed)
    train, val = split_documents(rest, d.val_fraction / (1 - d.test_fraction), d.split_seed + 1)
    corpora = {
        "train": _sample(train, d.train_sentences, d.split_seed),
        "val": _sample(val, d.val_sentences, d.split_seed),
        "test": _sample(test, d.test_sentences, d.split_seed),
    }
    if d.probe_sentences and len(corpus.classes) >= 2:
        corpora["probe"] = _sample(train, d.probe_sentences, d.split_seed + 2)
    if recipe.teacher.path is not None:
        folder = resolve_model_path(recipe.teacher.path)
        teacher, tokenizer = load_sentence_encoder(folder), load_tokenizer(folder)
    else:
        model, tokenizer = load_text_teacher(
            recipe.teacher, "encoder", corpora["train"].sentences, d.max_length, recipe.seed
        )
        teacher = SentenceEncoder(model)
    inputs, truncated = {}, 0
    for name, part in corpora.items():
        inputs[name], count = tokenize(tokenizer, part.sentences, d.max_length, teacher.model)
        truncated += count
    build_student(teacher, recipe.student)  # a bad keep list or width fails now
    return Prepared(teacher.eval(), tokenizer, inputs, corpora, truncated)


def build_student(teacher: SentenceEncoder, section: ReducedStudentSection) -> SentenceEncoder:
    """reduce_layers(teacher) with mean pooling; a narrower student gets a projection to the
    teacher's width (initialised from the teacher's projection, if it has one)."""
    model = reduce_layers(teacher.model, section.keep, hidden_size=section.hidden_size)
    student = SentenceEncoder(model, out_features=teacher.dim, normalize=teacher.normalize)
    if teacher.projection is not None:
        width = model.config.hidden_size
        student.projection = torch.nn.Linear(width, teacher.dim, bias=False)
        with torch.no_grad():
            student.projection.weight.copy_(teacher.projection.weight[:, :width])
    return student


def cache_embeddings(prepared: Prepared, folder: Path, resume: bool, progress: bool) -> int:
    """The teacher's embeddings of the training sentences into a store at `folder`; returns the
    packed length the store keys its samples by."""
    train = prepared.inputs["train"]
    length = train["input_ids"].shape[1]
    cache_teacher(
        PackedEncoder(prepared.teacher),
        pack(train, length),
        folder,
        precision="fp32",
        batch_size=64,
        resume=resume and (folder / "manifest.json").is_file(),
        command="stillroom distill (method: sentence_embedding)",
        progress=progress,
    )
    return length


def train_student(
    prepared: Prepared,
    recipe: SentenceEmbeddingRecipe,
    store: Path,
    length: int,
    val_targets: torch.Tensor,
    run_dir: Path | None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> SentenceEncoder:
    """Distil a fresh reduced student: MSE to the stored teacher embeddings (+ hidden-state
    cosine on the kept layers with the teacher live); best checkpoint by validation cosine."""
    d = recipe.distill
    student = build_student(prepared.teacher, recipe.student)
    if d.freeze_word_embeddings:
        student.model.get_input_embeddings().weight.requires_grad_(False)
    terms = [TermSpec("regression", d.mse_weight, name="embedding_mse")]
    teacher: Any = PackedStoreTeacher(store, length)
    if d.hidden_weight > 0:
        if student.model.config.hidden_size != prepared.teacher.model.config.hidden_size:
            raise StillroomError(
                "distill.hidden_weight compares hidden states of equal widths; the student is "
                "narrower: set distill.hidden_weight=0"
            )
        keep = recipe.student.keep or list(
            range(0, prepared.teacher.model.config.num_hidden_layers, 2)
        )
        terms.append(
            TermSpec(
                "hidden_state",
                d.hidden_weight,
                student=student.layers(),
                teacher=prepared.teacher.layers(),
                similarity="cosine",
                layer_map=tuple(enumerate(keep)),
                name="hidden_cos",
            )
        )
        teacher = prepared.teacher  # its layers run at every step: live, not the store
    train_targets = torch.zeros(len(prepared.inputs["train"]["input_ids"]))
    terms = [t for t in terms if t.weight > 0]
    args = train_args(d, recipe, terms, task="embedding", progress=progress, description="distill")
    result = distill(
        teacher,
        student,
        text_loader(prepared.inputs["train"], train_targets, recipe.data.batch_size, True),
        text_loader(prepared.inputs["val"], val_targets, 64, False),
        run_dir=run_dir,
        resume=resume,
        args=args,
    )
    return result.student.eval()


def measure(
    models: dict[str, SentenceEncoder], prepared: Prepared, section: EvalSection
) -> dict[str, dict[str, Any]]:
    """Per model on the test sentences: agreement with the teacher (the first model), probe
    accuracy, parameters, sentences/s (1 thread, batch 32, median) and the speed-up."""
    test = prepared.inputs["test"]
    timed = {k: v[: section.throughput_sentences] for k, v in test.items()}
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    for role, model in models.items():
        vectors = encode(model, test)
        reference = vectors if reference is None else reference
        row: dict[str, Any] = agreement(vectors, reference, section.k)
        if "probe" in prepared.inputs:
            row["probe_accuracy"] = probe_accuracy(
                encode(model, prepared.inputs["probe"]),
                prepared.corpora["probe"].labels,
                vectors,
                prepared.corpora["test"].labels,
            )
        row["layers"] = model.model.config.num_hidden_layers
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["sentences_per_s"] = throughput(
            model, timed, batch_size=32, repeats=section.throughput_repeats
        )
        rows[role] = row
    teacher = next(iter(rows.values()))
    for row in rows.values():
        row["speedup"] = row["sentences_per_s"] / teacher["sentences_per_s"]
        if "probe_accuracy" in row:
            row["probe_retention"] = row["probe_accuracy"] / teacher["probe_accuracy"]
    return rows


def run_sentence_embedding(
    recipe: SentenceEmbeddingRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Cache the teacher, distil the student, measure teacher / truncated / distilled on held-out
    sentences into results.json and results.md. Returns the results payload."""
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir, resume, force)
    prepared = prepare(recipe)
    prepare_run_dir(run_dir, recipe, resume, force, protected_paths(recipe.teacher, recipe.data))
    length = cache_embeddings(prepared, run_dir / "teacher_store", resume, progress)
    held_out = run_dir / "teacher_embeddings.safetensors"
    if held_out.is_file():
        targets = load_file(str(held_out))
    else:
        targets = {s: encode(prepared.teacher, prepared.inputs[s]) for s in ("val", "test")}
        atomic_save_tensors(targets, held_out)
    student_dir = run_dir / "student"
    if is_complete(student_dir):
        student = load_sentence_encoder(student_dir)
    else:
        student = train_student(
            prepared,
            recipe,
            run_dir / "teacher_store",
            length,
            targets["val"],
            student_dir,
            resume=resume and (student_dir / "checkpoints").is_dir(),
            progress=progress,
        )
        student.save(student_dir, prepared.tokenizer)
        mark_complete(student_dir)
    truncated = build_student(prepared.teacher, recipe.student)
    rows = measure(
        {"teacher": prepared.teacher, "student_truncated": truncated, "student_kd": student},
        prepared,
        recipe.eval,
    )
    payload = {
        "keep": recipe.student.keep
        or list(range(0, prepared.teacher.model.config.num_hidden_layers, 2)),
        "max_length": recipe.data.max_length,
        "sentences_truncated": prepared.truncated,
        "sentences": {name: len(part) for name, part in prepared.corpora.items()},
        "models": rows,
    }
    atomic_write_json(run_dir / "results.json", payload)
    write_summary(summarize(payload, run_dir), run_dir)
    return payload


COLUMNS = (
    ("similarity_spearman", "Spearman of pair similarities vs teacher"),
    ("cosine", "cosine to teacher"),
    ("top1", "top-1 retrieval agreement"),
    ("probe_accuracy", "linear-probe accuracy"),
)


FOLDERS = {"student_kd": "student"}
"""The saved models of the run folder (the teacher is read from its own folder, the truncated
student is rebuilt from it)."""


def summarize(payload: dict[str, Any], run_dir: Path) -> Summary:
    """The teacher, the untrained truncated student (the baseline) and the distilled one, by
    their agreement with the teacher's embeddings and a linear probe."""
    rows = payload["models"]
    recall = next(k for k in next(iter(rows.values())) if k.startswith("recall@"))
    roles = {"teacher": "teacher", "student_truncated": "baseline", "student_kd": "distilled"}
    keys = [key for key, _ in COLUMNS] + [recall, "sentences_per_s", "speedup"]
    models = [
        ModelResult(
            name=name,
            role=roles[name],  # type: ignore[arg-type]
            metrics={key: row.get(key) for key in keys},
            folder=FOLDERS.get(name),
            parameters=row["parameters"],
            size_bytes=weights_bytes(run_dir / FOLDERS[name]) if name in FOLDERS else None,
            architecture=f"{row['layers']} layers",
            teacher="teacher" if name == "student_kd" else "",
        )
        for name, row in rows.items()
    ]
    sizes = payload["sentences"]
    return Summary(
        method="sentence_embedding",
        title=f"sentence-embedding distillation: agreement with the teacher ({run_dir.name})",
        task="embedding",
        metric=COLUMNS[0][0],
        higher_is_better=True,
        models=models,
        settings={"keep": payload["keep"], "max_length": payload["max_length"]},
        notes=[
            "; ".join(f"{key}: {label}" for key, label in COLUMNS),
            f"test sentences {sizes['test']} from held-out documents; "
            f"{payload['sentences_truncated']} truncated to {payload['max_length']} tokens; "
            "sentences_per_s: 1 thread, batch 32",
        ],
        primary="student_kd",
    )
