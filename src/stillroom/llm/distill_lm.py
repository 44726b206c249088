"""The stages of a causal-LM distillation run, with plain arguments (recipes: methods/causal_lm.py).

    token_kd_args(alpha, beta=...)   alpha * token_kl + (1 - alpha) * next-token CE, as TrainArgs
    label_args()                     next-token CE alone (scratch students, tiny teachers)
    train_lm(folder, teacher, model, splits, args, ...)   one stage: the loop, then a HF folder
    compare(run_dir, teacher, students, test, ...)        the held-out table, gap closed in nats

A stage is complete once `folder/done.json` exists (written last, atomically): a resumed run
loads complete stages and continues a started one from the loop's checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from stillroom.io import atomic_write_json
from stillroom.llm.causal import CausalLM, count_parameters, heldout_metrics, save_causal_lm
from stillroom.llm.corpus import TokenBlocks, TokenSplits, make_token_loader
from stillroom.llm.hub import load_pretrained
from stillroom.objective import TermSpec
from stillroom.results import ModelResult, Summary, gap_note, write_summary
from stillroom.runs import DONE, is_complete, mark_complete
from stillroom.train import TrainArgs, distill


def token_kd_args(
    alpha: float,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **train: Any,
) -> TrainArgs:
    """`alpha * token_kl + (1 - alpha) * hard_label` on (N, L, V) logits and (N, L) next-token
    labels, token_kl masked to the labelled tokens (not padding, not prompts). alpha=None in the
    TrainArgs drops the loop's classic pair: these two terms are the whole objective.

    train: TrainArgs fields (epochs, lr, seed, progress, ...).
    """
    terms = (
        TermSpec(
            "token_kl",
            weight=alpha,
            beta=beta,
            temperature=temperature,
            chunk_size=chunk_size,
            mask="labels",
            name="token_kl",
        ),
        TermSpec("hard_label", weight=1.0 - alpha, name="hard_label"),
    )
    return TrainArgs(**train, task="language_modeling", alpha=None, terms=terms)


def label_args(**train: Any) -> TrainArgs:
    """Next-token cross-entropy alone: the scratch student, a tiny teacher."""
    terms = (TermSpec("hard_label", weight=1.0, name="hard_label"),)
    return TrainArgs(**train, task="language_modeling", alpha=None, terms=terms)


def train_lm(
    folder: Path,
    teacher: Any,
    model: nn.Module,
    splits: TokenSplits,
    args: TrainArgs,
    tokenizer: Any,
    vocab_size: int,
    batch_size: int,
    *,
    resume: bool = False,
    batch_transform: Any = None,
) -> CausalLM:
    """Train `model` (a Hugging Face causal LM, wrapped as CausalLM with `vocab_size` shared
    logits) through the loop into `folder`, then save it there as a Hugging Face folder with the
    tokenizer and write done.json. A complete folder is loaded instead of trained."""
    if is_complete(folder):
        return CausalLM(load_pretrained(folder, "causal_lm"), vocab_size)
    result = distill(
        teacher,
        CausalLM(model, vocab_size),
        make_token_loader(splits.train, batch_size, shuffle=True),
        make_token_loader(splits.val, batch_size, shuffle=False),
        run_dir=folder,
        resume=resume,
        args=args,
        batch_transform=batch_transform,
    )
    save_causal_lm(result.student.model, tokenizer, folder)
    seconds = sum(record["epoch_seconds"] for record in result.history)
    record = {"best_epoch": result.best_epoch, "val_perplexity": result.best_value}
    mark_complete(folder, {**record, "train_seconds": seconds})
    return result.student


@dataclass
class CausalLMResult:
    run_dir: Path
    rows: dict[str, dict[str, Any]]
    """teacher, student_scratch, student_kd -> held-out metrics, parameters, size, train time."""
    gap_closed: float | None
    info: dict[str, Any]


def compare(
    run_dir: Path,
    teacher: CausalLM,
    students: dict[str, CausalLM],
    test: TokenBlocks,
    batch_size: int,
    info: dict[str, Any],
) -> CausalLMResult:
    """Held-out metrics of teacher and students (`heldout_metrics`), their parameters, size on
    disk and training time, and the gap closed on the held-out loss (nats/token):
    (kd - scratch) / (teacher - scratch)."""
    models = {"teacher": teacher, **students}
    rows = heldout_metrics(models, make_token_loader(test, batch_size, shuffle=False), "teacher")
    for name, model in models.items():
        rows[name] |= count_parameters(model.model)
        weights, done = run_dir / name / "model.safetensors", run_dir / name / DONE
        if weights.is_file():
            rows[name]["size_bytes"] = weights.stat().st_size
        if done.is_file():
            rows[name]["train_seconds"] = json.loads(done.read_text())["train_seconds"]
    gap = None
    if "student_scratch" in rows:
        lead = rows["teacher"]["loss"] - rows["student_scratch"]["loss"]
        if abs(lead) > 1e-12:
            gap = (rows["student_kd"]["loss"] - rows["student_scratch"]["loss"]) / lead
    return CausalLMResult(run_dir, rows, gap, info)


def write_results(result: CausalLMResult) -> None:
    payload = {"gap_closed_loss": result.gap_closed, **result.info, "models": result.rows}
    atomic_write_json(result.run_dir / "results.json", payload)
    write_summary(summarize(result), result.run_dir)


def summarize(result: CausalLMResult) -> Summary:
    """Teacher, scratch and distilled students on the held-out next tokens."""
    roles = {"teacher": "teacher", "student_scratch": "baseline", "student_kd": "distilled"}
    keys = ("perplexity", "loss", "token_accuracy", "teacher_agreement", "tokens_per_second")
    models = [
        ModelResult(
            name=name,
            role=roles[name],  # type: ignore[arg-type]
            metrics={key: row.get(key) for key in keys},
            folder=name if (result.run_dir / name / "config.json").is_file() else None,
            parameters=row["parameters"],
            size_bytes=row.get("size_bytes"),
            architecture=f"{row['non_embedding_parameters']:,} non-embedding parameters",
            teacher="teacher" if name == "student_kd" else "",
        )
        for name, row in result.rows.items()
    ]
    loss = {name: row["loss"] for name, row in result.rows.items()}
    _, gap_line = gap_note(
        loss["teacher"], loss.get("student_scratch"), loss.get("student_kd"), "loss", False
    )
    tokens = next(iter(result.rows.values()))["heldout_tokens"]
    notes = [
        f"{tokens:,} held-out next tokens; loss: nats/token; teacher_agreement: share of them "
        "where the model's most likely next token is the teacher's; tokens_per_second: forward "
        "passes at the training batch size",
        gap_line + " (on the loss, nats/token)",
    ]
    if result.info.get("vocab", {}).get("note"):
        notes.append(f"vocabulary: {result.info['vocab']['note']}")
    if "on_policy_steps" in result.info:
        done, total = result.info["on_policy_steps"]
        notes.append(f"on-policy: {done} of {total} training steps used student samples")
    return Summary(
        method="causal_lm",
        title=f"causal LM distillation: held-out next tokens ({result.run_dir.name})",
        task="language_modeling",
        metric="perplexity",
        higher_is_better=False,
        models=models,
        notes=notes,
        primary="student_kd",
    )
