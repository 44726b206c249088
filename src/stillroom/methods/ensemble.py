"""Ensemble distillation (ensemble-to-single): N teachers of any architectures, merged into one
soft label, distilled into one small student (Bucilua et al. 2006, "Model compression"; Hinton et
al. 2015, arXiv:1503.02531, sec. 1 and 3).

    data -> every member (trained with its own seed, or loaded from a checkpoint)
         -> member weights (uniform, fixed, or fitted on the validation split)
         -> the ensemble's soft targets over the training set (members run once, read from one
            store per member, or from one merged store)
         -> student from labels alone (baseline) and distilled student -> test table

Run folder:
    config.yaml                 the resolved recipe (every field)
    teacher_0/ .. teacher_M-1/  each member: model.json + model.safetensors (+ metrics, checkpoints)
    ensemble.json               combine rule, member weights, validation loss/accuracy of the weights
    soft_targets.safetensors    the ensemble's logits for every training sample (not written when
                                they are read from a merged store, ensemble.store)
    student_scratch/            the student trained on labels alone
    student_kd/                 the student distilled from the ensemble
    results.json, results.md    the ensemble, every member and the students: test metric,
                                parameters, size, latency, agreement with the ensemble, gap closed
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from stillroom.config import (
    DataSection,
    DistillSection,
    ModelSection,
    RecipeBase,
    TeacherSection,
    check_student_trains,
)
from stillroom.data import ArrayData, Splits, make_loader
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.losses import IGNORE_INDEX
from stillroom.methods.ensemble_results import (
    EnsembleResult,
    evaluate_models,
    write_results,
)
from stillroom.models import load_model, save_model
from stillroom.objective import tapped_layers
from stillroom.pipeline import (
    build_seeded,
    check_task,
    load_fitting,
    prepare_data,
    train_phase,
    train_students,
)
from stillroom.runs import gap_closed, is_complete, prepare_run_dir
from stillroom.store import SoftTargetStore, StoreTeacher
from stillroom.teachers import (
    CachedTeacher,
    EnsembleModule,
    EnsembleTeacher,
    Teacher,
    combine_outputs,
    ensemble_weights,
    fit_ensemble_weights,
    generate_soft_targets,
)
from stillroom.train import predict
from stillroom.train.evaluate import METRICS

__all__ = [
    "EnsembleRecipe",
    "EnsembleResult",
    "EnsembleSection",
    "MemberSection",
    "run_ensemble",
]


class MemberSection(TeacherSection):
    """One member of the ensemble: trained here (kind, sizes, train), or loaded (checkpoint)."""

    seed_offset: int | None = Field(
        None,
        description="the member trains with seed + seed_offset (default: its position in "
        "teachers), so members of the same architecture still differ",
    )


class EnsembleSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    combine: Literal["mean_prob", "mean_logit"] = Field(
        "mean_prob",
        description="mean_prob: log of the (weighted) mean of the members' probabilities; "
        "mean_logit: the (weighted) mean of their logits (regression: of their predictions)",
    )
    weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="one weight per member (normalised to sum 1); null: uniform"
    )
    learn_weights: bool = Field(
        False,
        description="fit the weights on the validation split (softmax-parametrised, L-BFGS on "
        "the ensemble's validation loss)",
    )
    store: Path | None = Field(
        None,
        description="one merged store, written by stillroom.store.cache_teacher(EnsembleModule("
        "members, combine, weights), ...) for these members and data: the distilled student reads "
        "the ensemble's outputs from it",
    )


class EnsembleRecipe(RecipeBase):
    """An ensemble of teachers distilled into one student (method: ensemble)."""

    method: Literal["ensemble"] = "ensemble"
    name: str = "digits_ensemble"
    data: DataSection = DataSection()
    teachers: list[MemberSection] = Field(
        [
            MemberSection(kind="cnn"),
            MemberSection(kind="resnet", widths=[8, 16, 32]),
            MemberSection(kind="mlp", hidden=[256, 128]),
        ],
        min_length=1,
        description="the members, of any architectures; each trained with its own seed offset, "
        "loaded (checkpoint), and/or with its training outputs read from its own store",
    )
    ensemble: EnsembleSection = EnsembleSection()
    student: ModelSection = ModelSection()
    distill: DistillSection = DistillSection()
    baseline: bool = Field(
        True, description="also train the student on labels alone, for comparison"
    )
    absent: ClassVar[dict[str, str]] = {
        "teacher": "an ensemble recipe lists its members under 'teachers' (a list of teacher "
        "sections), not 'teacher'"
    }

    @field_validator("student")
    @classmethod
    def _student_trains(cls, student: ModelSection) -> ModelSection:
        check_student_trains(student)
        return student

    @field_validator("ensemble")
    @classmethod
    def _fits_teachers(cls, ensemble: EnsembleSection, info: ValidationInfo) -> EnsembleSection:
        teachers = info.data.get("teachers")
        if teachers is None:  # teachers failed validation: that error is the one to report
            return ensemble
        if ensemble.weights is not None and len(ensemble.weights) != len(teachers):
            raise ValueError(
                f"{len(ensemble.weights)} weights for {len(teachers)} teachers; give one per teacher"
            )
        if ensemble.weights is not None and sum(ensemble.weights) <= 0:
            raise ValueError("the weights are all 0; give at least one member a positive weight")
        if ensemble.weights is not None and ensemble.learn_weights:
            raise ValueError("weights and learn_weights contradict each other; set one")
        if ensemble.store is not None and any(t.store is not None for t in teachers):
            raise ValueError(
                "store (merged) and teachers[i].store (per member) both given; the student reads "
                "one of them: drop the other"
            )
        return ensemble


def run_ensemble(
    recipe: EnsembleRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> EnsembleResult:
    """Run every phase of `recipe` into `run_dir`; with `resume`, finished members are loaded, not
    retrained, and interrupted phases continue from their checkpoints."""
    run_dir = Path(run_dir)
    # everything that can be checked before any training is checked before the run folder exists
    splits, student_train = prepare_data(recipe)
    task = splits.train.task
    check_task(recipe, task)
    _check_recipe(recipe, task)
    loaded = _load_members(recipe, student_train)
    prepare_run_dir(run_dir, recipe, resume, force, _inputs(recipe))

    # 1. every member: loaded, finished in an earlier try of this run, or trained on every label
    members = [
        _member(recipe, i, section, loaded.get(i), run_dir, splits, progress, resume)
        for i, section in enumerate(recipe.teachers)
    ]

    # 2. the member weights, and the ensemble as one module
    weights, summary = _weights(recipe, members, splits.val, task)
    ensemble = EnsembleModule(members, recipe.ensemble.combine, weights)
    atomic_write_json(run_dir / "ensemble.json", summary)

    # 3. the ensemble's soft targets over every training input, labelled or not
    kd_teacher = _ensemble_targets(recipe, members, ensemble, student_train, run_dir)

    # 4. the same student architecture, from labels alone and distilled from the ensemble
    students = train_students(
        recipe, run_dir, kd_teacher, splits, student_train, progress=progress, resume=resume
    )

    # 5. the comparison on the held-out test split
    rows = evaluate_models(ensemble, members, students, splits.test, run_dir, task)
    metric = METRICS[task][0]
    gap = None
    if "student_scratch" in rows:
        gap = gap_closed({**rows, "teacher": rows["ensemble"]}, metric)
    result = EnsembleResult(
        run_dir, task, metric, recipe.ensemble.combine, ensemble.weights.tolist(), rows, gap
    )
    write_results(result, student_train, len(splits.test))
    return result


def _check_recipe(recipe: EnsembleRecipe, task: str) -> None:
    if recipe.distill.loss == "topk_soft_target":
        raise StillroomError(
            "distill.loss topk_soft_target reads a top-k store; the ensemble's merged targets are "
            "full outputs: use distill.loss=soft_target (or dkd)"
        )
    if task == "regression" and recipe.ensemble.combine == "mean_prob":
        raise StillroomError(
            f"ensemble.combine mean_prob averages class probabilities, but '{recipe.data.source}' "
            "is regression data; use ensemble.combine=mean_logit (the mean prediction)"
        )
    tapped = tapped_layers(list(recipe.train_args(recipe.distill, task).terms))[1]
    if tapped:
        raise StillroomError(
            f"distill.terms read teacher layers ({', '.join(tapped)}), but an ensemble has no "
            "single teacher to tap; keep output terms only (soft_target, dkd, hard_label)"
        )
    if recipe.ensemble.store is not None:
        # every shard hashed now: a missing or damaged store is named before any member trains
        store = SoftTargetStore.open(recipe.ensemble.store, verify=True)
        if store.kind != "dense":
            raise StillroomError(
                f"ensemble.store {recipe.ensemble.store} holds top-k targets; cache the ensemble "
                "without --top-k"
            )


def _load_members(
    recipe: EnsembleRecipe, student_train: ArrayData
) -> dict[int, tuple[torch.nn.Module, dict[str, Any]]]:
    """The members given as checkpoints, by position, with their stores (and the merged store,
    when every member is known already) checked against them: all before any training."""
    input_shape, num_outputs = student_train.input_shape, student_train.num_outputs
    loaded = {}
    for i, member in enumerate(recipe.teachers):
        if member.checkpoint is None:
            continue
        module, meta = load_fitting(
            member.checkpoint,
            input_shape,
            num_outputs,
            f"teachers[{i}]: checkpoint",
            "(and so every other member, which must give the same classes) ",
        )
        if member.store is not None:
            _member_store(i, member.store, module, student_train)
        loaded[i] = (module, meta)
    if len(loaded) == len(recipe.teachers) and not recipe.ensemble.learn_weights:
        modules = [loaded[i][0] for i in range(len(loaded))]
        weights = ensemble_weights(recipe.ensemble.weights, len(modules))
        ensemble = EnsembleModule(modules, recipe.ensemble.combine, weights)
        _merged_store(recipe, ensemble, student_train)
    return loaded


def _member_store(i: int, store: Path, module: torch.nn.Module, data: ArrayData) -> StoreTeacher:
    try:
        return StoreTeacher(store, teacher=module, data=data)
    except StillroomError as err:
        raise StillroomError(f"teachers[{i}].store: {err}") from None


def _merged_store(
    recipe: EnsembleRecipe, ensemble: EnsembleModule, data: ArrayData
) -> StoreTeacher | None:
    """The merged store (ensemble.store), checked against this ensemble and data; None if unset."""
    if recipe.ensemble.store is None:
        return None
    try:
        return StoreTeacher(recipe.ensemble.store, teacher=ensemble, data=data)
    except StillroomError as err:
        raise StillroomError(
            f"ensemble.store: {err} (a merged store holds one ensemble: these members, weights "
            "and combine rule)"
        ) from None


def _inputs(recipe: EnsembleRecipe) -> tuple[Path | None, ...]:
    """What the run reads and --force must never delete: data, stores, member checkpoints."""
    inputs = [recipe.data.path, recipe.ensemble.store]
    return tuple(inputs + [p for t in recipe.teachers for p in (t.checkpoint, t.store)])


def _member(
    recipe: EnsembleRecipe,
    i: int,
    section: MemberSection,
    loaded: tuple[torch.nn.Module, dict[str, Any]] | None,
    run_dir: Path,
    splits: Splits,
    progress: bool,
    resume: bool,
) -> torch.nn.Module:
    """Member i, saved to teacher_i/ (model.json is written last: its presence means finished)."""
    name = f"teacher_{i}"
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    if loaded is not None:
        module, meta = loaded
        save_model(
            module,
            meta["spec"],
            run_dir / name,
            input_shape=list(input_shape),
            num_outputs=num_outputs,
        )
        return module
    if resume and is_complete(run_dir / name):
        return load_model(run_dir / name)[0]
    seed = recipe.seed + (i if section.seed_offset is None else section.seed_offset)
    args = recipe.train_args(
        section.train, splits.train.task, alpha=0.0, progress=progress, description=name
    )
    return train_phase(
        name,
        run_dir,
        None,
        build_seeded(section.spec(), input_shape, num_outputs, seed),
        section.spec(),
        splits.train,  # every label: the members stand for the big models that already exist
        splits.val,
        replace(args, seed=seed),
        recipe.data.batch_size,
        resume,
    )


def _weights(
    recipe: EnsembleRecipe, members: list[torch.nn.Module], val: ArrayData, task: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The member weights (given, uniform, or fitted on validation) and what they score there."""
    combine = recipe.ensemble.combine
    loader = make_loader(val, 512, shuffle=False)
    val_outputs = torch.stack([predict(member, loader)[0] for member in members])
    if recipe.ensemble.learn_weights:
        weights = fit_ensemble_weights(val_outputs, val.targets, combine)
    else:
        weights = ensemble_weights(recipe.ensemble.weights, len(members))
    uniform = ensemble_weights(None, len(members))
    summary = {
        "combine": combine,
        "weights": weights.tolist(),
        "weights_from": "validation fit"
        if recipe.ensemble.learn_weights
        else ("recipe" if recipe.ensemble.weights else "uniform"),
        "validation": {
            "uniform": _score(combine_outputs(val_outputs, uniform, combine), val.targets, task),
            "used": _score(combine_outputs(val_outputs, weights, combine), val.targets, task),
        },
    }
    return weights, summary


def _score(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> dict[str, float]:
    """Validation loss (NLL of the ensemble's distribution, or MSE) and accuracy of merged outputs."""
    if task == "regression":
        keep = ~torch.isnan(targets)
        mse = F.mse_loss(outputs.view(targets.shape)[keep], targets[keep]).item()
        return {"mse": mse}
    keep = targets != IGNORE_INDEX
    # cross_entropy(log p_bar) is the NLL of p_bar: log_softmax leaves log-probabilities unchanged
    return {
        "nll": F.cross_entropy(outputs[keep], targets[keep]).item(),
        "accuracy": (outputs[keep].argmax(1) == targets[keep]).float().mean().item(),
    }


def _ensemble_targets(
    recipe: EnsembleRecipe,
    members: list[torch.nn.Module],
    ensemble: EnsembleModule,
    student_train: ArrayData,
    run_dir: Path,
) -> Teacher:
    """The teacher the distilled student reads: the merged store, or the merged soft targets
    (members run once over the training inputs, or read from their own stores)."""
    merged_store = _merged_store(recipe, ensemble, student_train)
    if merged_store is not None:
        return merged_store
    loader = make_loader(student_train, 512, shuffle=False)
    member_teachers: list[Teacher] = [
        _member_store(i, section.store, module, student_train)
        if section.store is not None
        else generate_soft_targets(module, loader)
        for i, (section, module) in enumerate(zip(recipe.teachers, members, strict=True))
    ]
    merged = EnsembleTeacher(member_teachers, ensemble.combine, ensemble.weights)
    # merged once, here, rather than at every step: the members' outputs do not change
    chunks = []
    with torch.no_grad():
        for inputs, _, index in loader:  # unshuffled: rows come in sample order
            chunks.append(merged(inputs, index))
    soft_targets = CachedTeacher(torch.cat(chunks))
    soft_targets.save(run_dir / "soft_targets.safetensors")
    return soft_targets
