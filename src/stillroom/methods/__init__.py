"""METHODS: the one table of distillation workflows a recipe's `method:` key can name.

Each row is the recipe schema the method validates against, the function that runs it into a run
folder, and the function that renders its results for the terminal. `stillroom distill RECIPE`
reads `method` from the recipe (default "classic"), validates the rest against that schema and runs
it; the Python API calls the run functions (or `stillroom.distill`) directly.

    run(recipe, run_dir, *, resume, progress, force) -> result
    show(result, title) -> a rich renderable (table) for the terminal
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stillroom.config import Recipe, read_recipe_tree, resolve_factories, validate_recipe
from stillroom.errors import StillroomError
from stillroom.methods import (
    born_again,
    causal_lm,
    encoder,
    ensemble,
    multitask,
    self_distill,
    sentence_embedding,
)
from stillroom.pipeline import run_recipe


@dataclass(frozen=True)
class Method:
    schema: type[BaseModel]
    run: Callable[..., Any]
    show: Callable[[Any, str], Any]
    summary: str
    report: bool = False
    """Whether `stillroom report` applies to the run folder (teacher, scratch and kd students)."""


def _show_classic(result: Any, title: str) -> Any:
    from stillroom.cli.common import results_table

    return results_table(title, result)


METHODS: dict[str, Method] = {
    "classic": Method(
        Recipe,
        run_recipe,
        _show_classic,
        "teacher -> student with soft targets and any extra terms (features, relations, DKD, "
        "adversarial), beside the same student trained on labels alone",
        report=True,
    ),
    # --- further methods: one row each, below this line ---
    "encoder": Method(
        encoder.EncoderRecipe,
        encoder.run_encoder,
        encoder.show,
        "DistilBERT-style: a transformers encoder reduced to some of its layers (sequence "
        "classification or masked LM), soft targets + hidden-state cosine + labels",
    ),
    "sentence_embedding": Method(
        sentence_embedding.SentenceEmbeddingRecipe,
        sentence_embedding.run_sentence_embedding,
        sentence_embedding.show,
        "a sentence encoder (e.g. all-MiniLM-L6-v2) distilled into a few of its layers: MSE to "
        "stored teacher embeddings; agreement, probe accuracy and throughput vs the teacher",
    ),
    "causal_lm": Method(
        causal_lm.CausalLMRecipe,
        causal_lm.run_causal_lm,
        causal_lm.show,
        "a causal language model (local Hugging Face folder or GGUF) distilled token by token into "
        "a smaller Llama: forward/reverse KL or generalized JSD, top-k store, on-policy (GKD)",
    ),
    "multitask": Method(
        multitask.MultiTaskRecipe,
        multitask.run_multitask,
        multitask.show,
        "a teacher with one head per task (classification and regression) distilled into a "
        "multi-head student, with per-task loss, temperature, alpha, weight and label fraction",
    ),
    "self_distill": Method(
        self_distill.SelfDistillRecipe,
        self_distill.run_self_distill,
        self_distill.show,
        "one network with early exits whose shallow exits learn from its deepest (Be Your Own "
        "Teacher); per exit accuracy and latency beside deep supervision and the plain network",
    ),
    "born_again": Method(
        born_again.ChainRecipe,
        born_again.run_chain,
        born_again.show,
        "a chain of generations, each trained student the teacher of the next (born-again: equal "
        "sizes; teacher-assistant: shrinking), beside each architecture trained on labels alone",
    ),
    "ensemble": Method(
        ensemble.EnsembleRecipe,
        ensemble.run_ensemble,
        ensemble.show,
        "several teachers of any architectures merged into one soft label (mean of probabilities "
        "or logits, fixed or validation-fitted weights) -> one student; reports every member",
    ),
}


def load_method_recipe(
    path: Path | str | None, overrides: list[str] | None = None
) -> tuple[Method, BaseModel]:
    """Read a recipe of any method: its `method` key picks the schema it is validated against."""
    tree, source = read_recipe_tree(path, overrides)
    name = tree.get("method", "classic")
    if not isinstance(name, str) or name not in METHODS:
        raise StillroomError(
            f"{source}: method: unknown method {name!r}; available: {', '.join(METHODS)}"
        )
    method = METHODS[name]
    recipe = validate_recipe(tree, source, method.schema)
    resolve_factories(recipe, path)
    return method, recipe
