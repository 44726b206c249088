"""Ranking distillation: a big recommender (or an ensemble of several) distilled into a small
real-time one, on implicit feedback (method: ranking).

    interactions file -> implicit feedback (rating >= threshold, or every interaction)
        -> leave-last-out split by time (last positive: test, the one before: validation)
        -> every teacher (NeuMF, two-tower, MF, or your own factory), trained on the training
           positives against sampled negatives (BCE, as NCF); several: their ensemble teaches
        -> the student from labels alone (student_scratch) and one distilled student per variant
           (student_<variant>: any mix of pointwise / ranking / listwise / relaxed terms,
           `loss = (1 - alpha) * hard + alpha * sum_i weight_i * term_i`)
        -> test: HR@10, NDCG@10, AUC of the held-out item among 99 (and 499) sampled negatives,
           full-catalogue recall@20; serving costs; the best student (by validation NDCG@10)
           exported to ONNX with a parity check

Run folder:
    config.yaml, ids.json          the recipe; the file's user and item id of each index
    teacher/ or teacher_0..M-1/    model.json + model.safetensors (+ done.json) per teacher
    student_scratch/, student_<variant>/
    onnx/                          the primary student: model.onnx, manifest.json (parity)
    summary.json, results.md       every model: test metrics, parameters, size, latency
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from torch import nn

from stillroom.config import RecipeBase
from stillroom.data.interactions import (
    Columns,
    Interactions,
    check_negatives,
    eval_candidates,
    prepare_interactions,
    read_interactions,
    sample_negatives,
    seen_keys,
)
from stillroom.errors import StillroomError
from stillroom.losses.ranking import (
    hard_label_ranking_loss,
    listwise_distillation_loss,
    pointwise_soft_label_loss,
    ranking_distillation_loss,
    relaxed_ranking_loss,
)
from stillroom.methods import ranking_eval
from stillroom.models import allow_factory, load_model, save_model
from stillroom.models.recommenders import RANKERS, RankerEnsemble, combine_scores, ranker_spec
from stillroom.results import write_summary
from stillroom.runs import is_complete, mark_complete, prepare_run_dir


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InteractionsSection(_Section):
    path: Path | None = Field(
        None, description="CSV / TSV / Parquet / JSON lines file, or a MovieLens .inter file"
    )
    package: str | None = Field(
        None,
        description="read `path` inside this installed package's folder, found without importing "
        "it (e.g. recbole, which ships MovieLens-100K: pip install --no-deps recbole)",
    )
    user_column: str = "user"
    item_column: str = "item"
    rating_column: str | None = Field(None, description="needed by positive_threshold")
    timestamp_column: str | None = Field(
        None, description="orders each user's interactions (file order without one)"
    )
    positive_threshold: float | None = Field(
        4.0,
        description="an interaction is a positive when its rating >= this; null: every "
        "interaction is a positive (implicit data without ratings)",
    )
    min_positives: int = Field(
        3, ge=3, description="users need this many positives (test, validation, >= 1 training)"
    )
    drop_sparse_users: bool = Field(
        True, description="drop users with fewer positives (counted); false: refuse the file"
    )
    eval_negatives: list[int] = Field(
        [99, 499],
        min_length=1,
        description="sampled negatives per held-out item; the first count is the headline",
    )
    train_negatives: int = Field(4, ge=1, description="sampled negatives per training positive")
    recall_k: int = Field(20, ge=1, description="full-catalogue recall@k")
    batch_size: int = Field(1024, ge=1)

    def file(self) -> Path:
        """The interactions file: `path`, or `path` inside the folder of `package`."""
        assert self.path is not None
        if self.package is None:
            return self.path
        import importlib.util

        try:
            spec = importlib.util.find_spec(self.package)  # finds, never imports, a top package
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise StillroomError(
                f"data.package {self.package!r} is not installed; install it (for MovieLens: "
                f"pip install --no-deps recbole)"
            )
        return Path(locations[0]) / self.path

    @model_validator(mode="after")
    def _threshold_has_ratings(self) -> InteractionsSection:
        if self.path is None:
            raise ValueError("path: give the interactions file (CSV, Parquet, JSON or .inter)")
        if self.package is not None and not self.package.isidentifier():
            raise ValueError(f"package {self.package!r}: name a top-level package, e.g. recbole")
        if self.positive_threshold is not None and self.rating_column is None:
            raise ValueError(
                "positive_threshold needs rating_column; or set positive_threshold: null"
            )
        if any(n < 1 for n in self.eval_negatives):
            raise ValueError("eval_negatives: every count must be >= 1")
        return self


ARCHS = (*RANKERS, "factory")


class RankerSection(_Section):
    arch: Literal[ARCHS] = Field(  # type: ignore[valid-type]
        "mf", description="mf, two_tower, neumf, or factory (your own module:function)"
    )
    dim: int = Field(8, ge=1, description="embedding width (mf, two_tower)")
    mf_dim: int = Field(32, ge=1, description="neumf: GMF embedding width")
    mlp_dim: int = Field(32, ge=1, description="neumf: MLP embedding width")
    hidden: list[int] = Field(
        [64, 32], min_length=1, description="neumf MLP widths; two_tower tower widths"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="neumf: before the output layer")
    factory: str | None = Field(
        None,
        description="arch factory: module:function(n_users, n_items, **kwargs) returning an "
        "nn.Module whose forward takes (B, 1 + K) ids (user, then items) and gives (B, K) scores",
    )
    kwargs: dict[str, Any] = {}
    epochs: int = Field(20, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better validation NDCG@10"
    )
    seed_offset: int | None = None

    @model_validator(mode="after")
    def _factory_named(self) -> RankerSection:
        if (self.arch == "factory") != (self.factory is not None):
            raise ValueError("arch factory and factory: module:function go together")
        return self

    def spec(self, n_users: int, n_items: int) -> dict[str, Any]:
        if self.arch == "factory":
            return {
                "kind": "factory",
                "factory": self.factory,
                "kwargs": {"n_users": n_users, "n_items": n_items, **self.kwargs},
                "search_paths": [],
            }
        sizes = {
            "mf": {"dim": self.dim},
            "two_tower": {"dim": self.dim, "hidden": self.hidden},
            "neumf": {"mf_dim": self.mf_dim, "mlp_dim": self.mlp_dim, "hidden": self.hidden,
                      "dropout": self.dropout},
        }[self.arch]  # fmt: skip
        return ranker_spec(self.arch, n_users, n_items, **sizes)

    def label(self) -> str:
        if self.arch == "factory":
            return f"factory {self.factory}"
        if self.arch == "neumf":
            return f"neumf {self.mf_dim}+{self.mlp_dim}/{'-'.join(map(str, self.hidden))}"
        if self.arch == "two_tower":
            return f"two_tower {self.dim}/{'-'.join(map(str, self.hidden))}"
        return f"mf {self.dim}"


TERM_KINDS = ("pointwise", "ranking", "listwise", "relaxed")


class RankTerm(_Section):
    kind: Literal[TERM_KINDS] = Field(  # type: ignore[valid-type]
        description="pointwise: BCE to the teacher's probabilities; ranking: the teacher's top-K "
        "as weighted positives (Tang & Wang 2018); listwise: KL of softmaxes over the list; "
        "relaxed: Plackett-Luce on the teacher's top-K vs sampled items (DE-RRD)"
    )
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0, description="pointwise, listwise")
    top_k: int = Field(10, ge=1, description="ranking, relaxed: the teacher's items per user")
    lam: float = Field(1.0, gt=0, description="ranking: position weights exp(-r / lam)")
    samples: int = Field(
        32, ge=1, description="pointwise, listwise, relaxed: extra uniformly sampled items"
    )


class RankDistillSection(_Section):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation terms")
    variants: dict[str, list[RankTerm]] = Field(
        {"pointwise": [RankTerm(kind="pointwise")]},
        min_length=1,
        description="one distilled student per entry: name -> its terms",
    )

    @model_validator(mode="after")
    def _names(self) -> RankDistillSection:
        for name, terms in self.variants.items():
            if not name.isidentifier() or name == "scratch":
                raise ValueError(f"variant name {name!r}: use a word other than 'scratch'")
            if not terms:
                raise ValueError(f"variant {name!r} has no terms")
        return self


class RankingRecipe(RecipeBase):
    """A big ranker (or ensemble) -> a small real-time one (method: ranking)."""

    method: Literal["ranking"] = "ranking"
    name: str = "ranking"
    data: InteractionsSection
    teachers: list[RankerSection] = Field(
        [RankerSection(arch="neumf", mf_dim=64, mlp_dim=64, hidden=[128, 64])], min_length=1
    )
    combine: Literal["mean_prob", "mean_logit"] = "mean_prob"
    student: RankerSection = RankerSection()
    distill: RankDistillSection = RankDistillSection()
    baseline: bool = True
    export_onnx: bool = Field(True, description="export the best student to ONNX (parity checked)")
    serving_repeats: int = Field(
        100, ge=1, description="timed calls per model for the latency median (batch 1)"
    )


def run_ranking(
    recipe: RankingRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Any:
    """Every phase of `recipe` into `run_dir` (finished phases are loaded on --resume)."""
    run_dir = Path(run_dir)
    data, tests, val = _prepare(recipe)
    sections = [*recipe.teachers, recipe.student]
    for section in sections:
        if section.factory is not None:
            allow_factory(section.factory)
    specs = {id(s): s.spec(data.n_users, data.n_items) for s in sections}
    prepare_run_dir(run_dir, recipe, resume, force, (recipe.data.path,))
    data.save_ids(run_dir / "ids.json")
    keys = seen_keys(data)
    say = Console(stderr=True, quiet=not progress).print

    # 1. the teachers, trained on the training positives against sampled negatives
    names = (
        ["teacher"]
        if len(recipe.teachers) == 1
        else [f"teacher_{i}" for i in range(len(recipe.teachers))]
    )
    teachers = []
    for i, (name, section) in enumerate(zip(names, recipe.teachers, strict=True)):
        seed = recipe.seed + (i if section.seed_offset is None else section.seed_offset)
        teachers.append(
            _phase(run_dir / name, specs[id(section)], section, data, keys, val, seed, resume,
                   say, recipe.data)
        )  # fmt: skip
    kd_teacher: nn.Module = (
        teachers[0] if len(teachers) == 1 else RankerEnsemble(teachers, recipe.combine)
    )
    kd_name = "teacher" if len(teachers) == 1 else "ensemble"
    for model in teachers:
        model.requires_grad_(False)
    top_k = max((t.top_k for ts in recipe.distill.variants.values() for t in ts), default=1)
    # every teacher's score of every item, once: the students' terms look their teacher up here
    full = {
        n: ranking_eval.full_scores(m, data.n_users, data.n_items)
        for n, m in zip(names, teachers, strict=True)
    }
    if len(teachers) > 1:
        full["ensemble"] = combine_scores(torch.stack([full[n] for n in names]), recipe.combine)
    top = ranking_eval.teacher_top(full[kd_name], data, top_k)

    # 2. the students: from labels alone, and one per variant of distillation terms
    students: dict[str, nn.Module] = {}
    student_spec = specs[id(recipe.student)]
    plans = {"student_scratch": []} if recipe.baseline else {}
    plans |= {f"student_{v}": terms for v, terms in recipe.distill.variants.items()}
    for name, terms in plans.items():
        students[name] = _phase(
            run_dir / name, student_spec, recipe.student, data, keys, val, recipe.seed + 100,
            resume, say, recipe.data, teacher=full[kd_name], top=top, terms=terms,
            alpha=recipe.distill.alpha,
        )  # fmt: skip

    # 3. test metrics and serving costs of every model
    rows: dict[str, dict[str, Any]] = {}
    roles: dict[str, str] = {}
    archs: dict[str, str] = {}
    if len(teachers) > 1:
        rows["ensemble"] = _row("ensemble", kd_teacher, None, data, tests, recipe, full["ensemble"])
        rows["ensemble"]["size_bytes"] = sum(
            (run_dir / n / "model.safetensors").stat().st_size for n in names
        )
        roles["ensemble"], archs["ensemble"] = "ensemble", f"{recipe.combine} of {len(teachers)}"
    for name, model, section in zip(names, teachers, recipe.teachers, strict=True):
        rows[name] = _row(name, model, run_dir / name, data, tests, recipe, full[name])
        roles[name] = "teacher" if len(teachers) == 1 else "member"
        archs[name] = section.label()
    val_ndcg = {}
    for name, model in students.items():
        rows[name] = _row(name, model, run_dir / name, data, tests, recipe)
        roles[name] = "baseline" if name == "student_scratch" else "distilled"
        archs[name] = recipe.student.label()
        val_ndcg[name] = ranking_eval.candidate_metrics(ranking_eval.score_rows(model, val))[
            f"ndcg@{ranking_eval.K}"
        ]
    distilled = [n for n in students if roles[n] == "distilled"]
    primary = max(distilled, key=lambda n: val_ndcg[n]) if distilled else None

    # 4. the primary student exported to ONNX, parity on the test candidates
    notes = [
        f"data: {data.n_users} users ({data.dropped_users} dropped, < {recipe.data.min_positives} "
        f"positives), {data.n_items} items, {data.positives} positives "
        + (f"(rating >= {recipe.data.positive_threshold})" if recipe.data.positive_threshold
           is not None else "(every interaction)")
        + "; leave-last-out by time",
        f"metrics: 1 held-out positive vs {recipe.data.eval_negatives[0]} sampled negatives "
        f"(suffix _Nneg: vs N); recall@{recipe.data.recall_k}_full ranks the whole catalogue "
        "(training and validation items excluded); latency: 100 candidates, batch 1, median; "
        f"users_per_s: batches of {ranking_eval.THROUGHPUT_BATCH}",
        f"primary: {primary} (best validation ndcg@10 among the distilled students)",
    ]  # fmt: skip
    if primary and recipe.export_onnx:
        notes.append(_export(students[primary], run_dir / primary, tests, run_dir / "onnx"))
    settings = {
        "alpha": recipe.distill.alpha,
        "variants": {v: [t.kind for t in ts] for v, ts in recipe.distill.variants.items()},
        "student_vs_teacher_parameters": rows[primary or names[0]]["parameters"]
        / rows[kd_name if kd_name in rows else names[0]]["parameters"],
        "seed": recipe.seed,
    }
    for name, row in rows.items():
        row["folder"] = None if name == "ensemble" else name
    summary = ranking_eval.summarize(run_dir, rows, roles, archs, kd_name, primary, settings, notes)
    write_summary(summary, run_dir)
    return summary


def _prepare(recipe: RankingRecipe) -> tuple[Interactions, dict[int, np.ndarray], np.ndarray]:
    section = recipe.data
    assert section.path is not None
    source = str(section.path)
    columns = Columns(
        section.user_column, section.item_column, section.rating_column, section.timestamp_column
    )
    raw = read_interactions(section.file(), columns)
    data = prepare_interactions(
        raw, section.positive_threshold, section.min_positives, source, section.drop_sparse_users
    )
    for count in section.eval_negatives:
        check_negatives(data, count, source)
    check_negatives(data, section.train_negatives, source)
    # test and validation candidates are fixed by the seed: every model is scored on the same ones
    tests = {
        n: eval_candidates(data, data.test_items, n, recipe.seed + 7 * n)
        for n in section.eval_negatives
    }
    val = eval_candidates(data, data.val_items, section.eval_negatives[0], recipe.seed + 1)
    return data, tests, val


def _row(
    name: str,
    model: nn.Module,
    folder: Path | None,
    data: Interactions,
    tests: dict[int, np.ndarray],
    recipe: RankingRecipe,
    scores: torch.Tensor | None = None,
) -> dict[str, Any]:
    metrics = ranking_eval.evaluate_ranker(model, data, tests, recipe.data.recall_k, scores)
    return ranking_eval.model_row(name, model, folder, data, metrics, recipe.serving_repeats)


def _phase(
    folder: Path,
    spec: dict[str, Any],
    section: RankerSection,
    data: Interactions,
    keys: np.ndarray,
    val: np.ndarray,
    seed: int,
    resume: bool,
    say: Any,
    data_section: InteractionsSection,
    teacher: torch.Tensor | None = None,
    top: torch.Tensor | None = None,
    terms: list[RankTerm] = (),  # type: ignore[assignment]
    alpha: float = 0.0,
) -> nn.Module:
    """One model trained into `folder` (model.json + safetensors + done.json); loaded on resume."""
    if resume and is_complete(folder):
        return load_model(folder)[0]
    from stillroom.models import build_model

    torch.manual_seed(seed)
    shape = [1 + ranking_eval.SERVE_CANDIDATES]
    model = build_model(spec, tuple(shape), ranking_eval.SERVE_CANDIDATES)
    best, history = train_ranker(
        model, data, keys, val, section, data_section, seed, teacher, top, list(terms), alpha
    )
    say(f"{folder.name}: best validation ndcg@10 {best:.4f} ({len(history)} epochs)")
    save_model(model, spec, folder, input_shape=shape, num_outputs=ranking_eval.SERVE_CANDIDATES,
               ids="../ids.json")  # fmt: skip
    mark_complete(folder, {"val_ndcg@10": best, "history": history})
    return model


def train_ranker(
    model: nn.Module,
    data: Interactions,
    keys: np.ndarray,
    val: np.ndarray,
    section: RankerSection,
    data_section: InteractionsSection,
    seed: int,
    teacher: torch.Tensor | None = None,
    top: torch.Tensor | None = None,
    terms: list[RankTerm] | None = None,
    alpha: float = 0.0,
) -> tuple[float, list[float]]:
    """Adam over shuffled training positives, each with `train_negatives` sampled negatives:

        loss = (1 - alpha) * BCE(labels) + alpha * sum_i weight_i * term_i   (no terms: BCE)

    The best epoch by validation NDCG@10 is kept (its weights are loaded back into `model`).
    Returns (best validation NDCG@10, the validation NDCG@10 of every epoch)."""
    terms = terms or []
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    users_all = torch.as_tensor(data.train_users)
    items_all = torch.as_tensor(data.train_items)
    n, n_neg = len(users_all), data_section.train_negatives
    labels = torch.zeros(1, 1 + n_neg)
    labels[0, 0] = 1.0
    best, best_state, history, stale = -1.0, None, [], 0
    for _ in range(section.epochs):
        model.train()
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n, data_section.batch_size):
            idx = order[start : start + data_section.batch_size]
            users, positives = users_all[idx], items_all[idx]
            negatives = torch.as_tensor(
                sample_negatives(users.numpy(), n_neg, data.n_items, keys, rng)
            )
            items = torch.cat([positives[:, None], negatives], dim=1)
            scores = model(torch.cat([users[:, None], items], dim=1))
            loss = hard_label_ranking_loss(scores, labels.expand_as(scores))
            if terms:
                kd = sum(
                    t.weight * _term(t, model, teacher, top, users, items, data, rng) for t in terms
                )
                loss = (1 - alpha) * loss + alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = ranking_eval.candidate_metrics(ranking_eval.score_rows(model, val))[
            f"ndcg@{ranking_eval.K}"
        ]
        history.append(score)
        if score > best:
            best, stale = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if section.patience is not None and stale >= section.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return best, history


def _term(
    term: RankTerm,
    model: nn.Module,
    teacher: torch.Tensor | None,
    top: torch.Tensor | None,
    users: torch.Tensor,
    items: torch.Tensor,
    data: Interactions,
    rng: np.random.Generator,
) -> torch.Tensor:
    """One distillation term on a batch: (B,) users, (B, 1 + n_neg) training candidates;
    `teacher`: (n_users, n_items) the teacher's scores of every item (constants)."""
    assert teacher is not None and top is not None
    if term.kind in ("pointwise", "listwise", "relaxed"):
        extra = torch.as_tensor(rng.integers(0, data.n_items, size=(len(users), term.samples)))
    if term.kind in ("pointwise", "listwise"):
        listed = torch.cat([items, extra], dim=1)
        teacher_scores = teacher[users[:, None], listed]
        student_scores = model(torch.cat([users[:, None], listed], dim=1))
        loss = pointwise_soft_label_loss if term.kind == "pointwise" else listwise_distillation_loss
        return loss(student_scores, teacher_scores, term.temperature)
    ranked = top[users, : term.top_k]
    if term.kind == "ranking":
        return ranking_distillation_loss(
            model(torch.cat([users[:, None], ranked], 1)), lam=term.lam
        )
    # relaxed: the teacher's top-k in its order vs uniformly sampled items (rarely in its top-k)
    both = model(torch.cat([users[:, None], ranked, extra], 1))
    return relaxed_ranking_loss(both[:, : term.top_k], both[:, term.top_k :])


def _export(model: nn.Module, folder: Path, tests: dict[int, np.ndarray], out: Path) -> str:
    """The student as ONNX (ids in, scores out; batch and candidate count dynamic), its parity
    checked on the test candidates; returns the note for the table."""
    import json

    from stillroom.export.formats import Signature, export_model

    rows = torch.as_tensor(next(iter(tests.values())), dtype=torch.long)
    signature = Signature(
        names=("candidates",),
        dynamic=({0: "batch", 1: "candidates"},),
        output="scores",
        output_axes={0: "batch", 1: "candidates"},
    )
    meta = json.loads((folder / "model.json").read_text())
    result = export_model(
        model, (rows[:2],), out, check_inputs=(rows,), config=meta, formats=("onnx",),
        force=True, signature=signature, task="ranking",
        source={"role": folder.name, "split": "test candidates"},
    )  # fmt: skip
    parity = result.manifest["parity"]["formats"]["onnx"]
    return (
        f"onnx: {out.name}/model.onnx ({folder.name}), max |onnx - torch| "
        f"{parity['max_abs_diff']:.2e} over {len(rows)} users' test candidates"
    )
