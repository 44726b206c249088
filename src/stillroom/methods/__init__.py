"""METHODS: the one table of distillation workflows a recipe's `method:` key can name.

Each row is the recipe schema the method validates against and the function that runs it into a
run folder. `stillroom distill RECIPE` reads `method` from the recipe (default "classic"),
validates the rest against that schema and runs it; the Python API calls the run functions (or
`stillroom.distill`) directly.

The contract every method keeps (see stillroom.runs and stillroom.results):
    run(recipe, run_dir, *, resume, progress, force) -> the method's own result object, having
        - claimed the folder with `runs.prepare_run_dir` (marker, lock, --resume/--force),
        - run each phase into its own subfolder (a stillroom model folder, or a transformers
          folder), marked finished by `runs.mark_complete` (done.json, written last) so that
          --resume loads it (`runs.is_complete`) and continues any other from its checkpoints,
        - written RUN_DIR/summary.json + results.md with `results.write_summary`: every model
          with its role and test metrics, the one table the terminal, `stillroom report` and
          `stillroom export RUN_DIR` read.
A new method is one file here, one row below, one recipe in recipes/ and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from stillroom.config import (
    grant_remote_code,
    read_recipe_tree,
    resolve_factories,
    shorten,
    validate_recipe,
)
from stillroom.errors import StillroomError
from stillroom.methods import (
    born_again,
    causal_lm,
    classic,
    continual,
    dense,
    encoder,
    ensemble,
    federated,
    interpretable,
    multitask,
    ranking,
    self_distill,
    sentence_embedding,
)


class RunMethod(Protocol):
    def __call__(
        self,
        recipe: Any,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        force: bool = False,
    ) -> Any: ...


@dataclass(frozen=True)
class Method:
    schema: type[BaseModel]
    run: RunMethod
    summary: str


METHODS: dict[str, Method] = {
    "classic": Method(
        classic.Recipe,
        classic.run_recipe,
        "teacher -> student with soft targets and any extra terms (features, relations, DKD, "
        "adversarial), beside the same student trained on labels alone",
    ),
    # --- further methods: one row each, below this line ---
    "encoder": Method(
        encoder.EncoderRecipe,
        encoder.run_encoder,
        "DistilBERT-style: a transformers encoder reduced to some of its layers (sequence "
        "classification or masked LM), soft targets + hidden-state cosine + labels",
    ),
    "sentence_embedding": Method(
        sentence_embedding.SentenceEmbeddingRecipe,
        sentence_embedding.run_sentence_embedding,
        "a sentence encoder (e.g. all-MiniLM-L6-v2) distilled into a few of its layers: MSE to "
        "stored teacher embeddings; agreement, probe accuracy and throughput vs the teacher",
    ),
    "causal_lm": Method(
        causal_lm.CausalLMRecipe,
        causal_lm.run_causal_lm,
        "a causal language model (local Hugging Face folder or GGUF) distilled token by token into "
        "a smaller Llama: forward/reverse KL or generalized JSD, top-k store, on-policy (GKD)",
    ),
    "multitask": Method(
        multitask.MultiTaskRecipe,
        multitask.run_multitask,
        "a teacher with one head per task (classification and regression) distilled into a "
        "multi-head student, with per-task loss, temperature, alpha, weight and label fraction",
    ),
    "self_distill": Method(
        self_distill.SelfDistillRecipe,
        self_distill.run_self_distill,
        "one network with early exits whose shallow exits learn from its deepest (Be Your Own "
        "Teacher); per exit accuracy and latency beside deep supervision and the plain network",
    ),
    "born_again": Method(
        born_again.ChainRecipe,
        born_again.run_chain,
        "a chain of generations, each trained student the teacher of the next (born-again: equal "
        "sizes; teacher-assistant: shrinking), beside each architecture trained on labels alone",
    ),
    "ensemble": Method(
        ensemble.EnsembleRecipe,
        ensemble.run_ensemble,
        "several teachers of any architectures merged into one soft label (mean of probabilities "
        "or logits, fixed or validation-fitted weights) -> one student; reports every member",
    ),
    "ranking": Method(
        ranking.RankingRecipe,
        ranking.run_ranking,
        "a big recommender (NeuMF, two-tower) or ensemble distilled into a small real-time one on "
        "implicit feedback: pointwise, ranking (Tang & Wang), listwise, relaxed (DE-RRD) terms",
    ),
    "federated": Method(
        federated.FederatedRecipe,
        federated.run_federated,
        "clients that never pool their data, on a Dirichlet non-IID split: FedAvg vs FedDF "
        "(server-side ensemble distillation, heterogeneous clients), local-only, centralised",
    ),
    "continual": Method(
        continual.ContinualRecipe,
        continual.run_continual,
        "a model kept current over a task sequence (class- or domain-incremental), distilling "
        "from itself: fine-tuning, LwF, LwF + exemplar memory, joint; accuracy matrix, forgetting",
    ),
    "dense": Method(
        dense.DenseRecipe,
        dense.run_dense,
        "segmentation / CenterNet-style detection: a fully-convolutional teacher -> a small one "
        "with pixel-wise soft targets, channel-wise (CWD), heatmap, box and feature terms",
    ),
    "interpretable": Method(
        interpretable.InterpretableRecipe,
        interpretable.run_interpretable,
        "a network teacher distilled into a decision tree, a rule list and a sparse linear model "
        "(scikit-learn; ONNX via skl2onnx), beside each fitted to labels; fidelity and rules",
    ),
}


def load_method_recipe(
    path: Path | str | None,
    overrides: list[str] | None = None,
    *,
    trust_remote_code: bool = False,
) -> tuple[Method, BaseModel]:
    """Read a recipe of any method: its `method` key picks the schema it is validated against.
    trust_remote_code: the caller's grant (never the recipe's) to run a model folder's code."""
    tree, source = read_recipe_tree(path, overrides, trust_remote_code=trust_remote_code)
    name = tree.get("method", "classic")
    if not isinstance(name, str) or name not in METHODS:
        raise StillroomError(
            f"{source}: method: unknown method {shorten(repr(name))}; available: "
            f"{', '.join(METHODS)}"
        )
    method = METHODS[name]
    if trust_remote_code:
        grant_remote_code(tree, method.schema, source)
    recipe = validate_recipe(tree, source, method.schema)
    resolve_factories(recipe, path)
    return method, recipe
