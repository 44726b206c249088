"""Self-distillation: the shallow exits of one network learn from its deepest exit while the whole
network trains (Zhang et al. 2019, "Be Your Own Teacher", arXiv:1905.08094, eq. 1-3).

For every exit i (shallowest first) with logits q_i, the deepest exit C and labels y:

    loss = sum_i (1 - alpha) * CE(q_i, y)                           every exit, the deepest too
         + sum_{i<C} alpha * KL(softmax(q_C / T) || softmax(q_i / T)) * T**2
         + sum_{i<C} feature_weight * ||proj(F_i) - F_C||^2          optional feature hints

The deepest exit's logits and features enter the KD and hint terms detached (`source="student"`
terms of stillroom.objective): the deep exit teaches, it is not pulled toward the shallow ones.
No teacher model exists and the loop is the ordinary one: the terms above are `TermSpec`s.

Run folder (`stillroom distill recipes/digits_self_distill.yaml`):
    config.yaml                  the resolved recipe
    self_distilled/              (a) the multi-exit network with self-distillation: model.json
                                 (kind multiexit) + model.safetensors, metrics.jsonl, checkpoints/,
      exits/<exit>/              and each exit as a standalone network: model.json (kind multiexit
                                 with "exit") + model.safetensors; `stillroom.models.load_model`
                                 rebuilds it, `stillroom.export.export_model` exports it
    deeply_supervised/           (b) the same network with cross-entropy on every exit only
    scratch/                     (c) the plain network (no exits, kind resnet) on labels alone
    results.json, results.md     per exit: test accuracy of (a) and (b), parameters, size, CPU
                                 latency at batch 1 of the standalone exit; (c) beside them
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, default_collate

from stillroom.config import DataSection, RecipeBase, TrainSection
from stillroom.data import labelled_only, make_loader
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json
from stillroom.losses.features import make_projector
from stillroom.measure import latency_ms
from stillroom.models import count_parameters, load_model, save_model
from stillroom.models.multiexit import FINAL, MultiExitResNet, exit_model, exit_names
from stillroom.objective import TermSpec
from stillroom.pipeline import build_seeded, prepare_data, train_phase
from stillroom.results import ModelResult, Summary, write_summary
from stillroom.runs import is_complete, mark_complete, prepare_run_dir
from stillroom.taps import feature_shapes
from stillroom.train import DistillResult, TrainArgs, distill, evaluate

# ---------------------------------------------------------------- the method over any nn.Module


def self_distillation_terms(
    exits: list[str],
    *,
    alpha: float,
    temperature: float,
    feature_weight: float = 0.0,
    feature_layers: dict[str, str] | None = None,
    final_feature: str | None = None,
) -> list[TermSpec]:
    """The objective above as terms. `exits` are output names, deepest last (the teacher).

    Per exit: `hard_label:<exit>` (weight 1 - alpha); per shallow exit: `soft_target:<exit>`
    (weight alpha, the deepest exit's logits as targets) and, with feature_weight > 0,
    `hint:<exit>` from `feature_layers[exit]` to `final_feature` (a projector when widths differ).
    """
    *shallow, final = exits
    terms = [
        TermSpec("hard_label", 1.0 - alpha, output=name, name=f"hard_label:{name}")
        for name in exits
    ]
    terms += [
        TermSpec(
            "soft_target",
            alpha,
            temperature=temperature,
            output=name,
            teacher_output=final,
            source="student",
            name=f"soft_target:{name}",
        )
        for name in shallow
    ]
    if feature_weight > 0:
        assert feature_layers is not None and final_feature is not None
        terms += [
            TermSpec(
                "hint",
                feature_weight,
                student=feature_layers[name],
                teacher=final_feature,
                source="student",
                name=f"hint:{name}",
            )
            for name in shallow
        ]
    return terms


class _PerOutputTargets:
    """Collate that gives every named output the batch's labels (evaluation reads dict targets)."""

    def __init__(self, collate: Any, names: list[str]) -> None:
        self.collate, self.names = collate, names

    def __call__(self, samples: list[Any]) -> Any:
        batch = list(self.collate(samples))
        if not isinstance(batch[1], dict):
            batch[1] = {name: batch[1] for name in self.names}
        return tuple(batch)


def per_output_targets(loader: DataLoader, names: list[str]) -> DataLoader:
    """The same batches, with targets {name: labels} for each output name."""
    collate = _PerOutputTargets(loader.collate_fn or default_collate, names)
    if loader.batch_size is None:  # a custom batch sampler
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=collate)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, collate_fn=collate
    )


def model_exits(model: nn.Module, example: Any) -> list[str]:
    """The output names of a multi-exit model (its dict's order: shallowest first, deepest last)."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(example)
    finally:
        for module, flag in flags.items():
            module.train(flag)
    if not isinstance(outputs, dict) or len(outputs) < 2:
        raise StillroomError(
            f"self-distillation needs a model whose forward returns a dict of 2+ exits, "
            f"got {type(outputs).__name__}; see stillroom.models.multiexit.MultiExitResNet"
        )
    return list(outputs)


def check_feature_pairs(
    model: nn.Module, example: Any, feature_layers: dict[str, str], final_feature: str
) -> None:
    """Fail (one line) when an exit's feature cannot be projected onto the deepest feature."""
    shapes = feature_shapes(model, example, [*feature_layers.values(), final_feature])
    for name, layer in feature_layers.items():
        what = (
            f"feature_weight > 0, but exit '{name}' feature '{layer}' {shapes[layer][1:]} "
            f"cannot be projected onto the deepest feature '{final_feature}' "
            f"{shapes[final_feature][1:]}"
        )
        try:
            make_projector(shapes[layer], shapes[final_feature])
        except ValueError:
            raise StillroomError(
                f"{what}: hint maps to maps (N, C, H, W) or vectors to vectors (N, D); pick such "
                "layers, or set feature_weight=0"
            ) from None


def self_distill(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 3.0,
    feature_weight: float = 0.0,
    exits: list[str] | None = None,
    feature_layers: dict[str, str] | None = None,
    final_feature: str | None = None,
    hint_at: str = "map",
    select: str | None = None,
    run_dir: Path | str | None = None,
    resume: bool = False,
    args: TrainArgs | None = None,
    **overrides: Any,
) -> DistillResult:
    """Train a multi-exit `model` whose shallow exits learn from its deepest one (no teacher).

    Args:
        model: forward(x) -> {exit: (N, C) logits}, shallowest first, deepest last (e.g.
            `MultiExitResNet`).
        train_loader / val_loader: as for `stillroom.distill`, plain (N,) labels; validation logs
            `val/<exit>/accuracy` for every exit.
        alpha: weight of each shallow exit's KD term; 1 - alpha weights every exit's CE.
            alpha=0 and feature_weight=0 is deep supervision (CE on every exit, no distillation).
        temperature: T of the KD terms (scaled by T**2).
        feature_weight: weight of each shallow exit's hint toward the deepest feature.
        exits: the output names to train, deepest last (default: every output, in order).
        feature_layers / final_feature: module names of each shallow exit's feature and of the
            deepest feature; default for a MultiExitResNet: `model.feature_layers(hint_at)`.
        select: the exit whose validation accuracy picks the best checkpoint (default: deepest).
        run_dir / resume / args / overrides: as for `stillroom.distill` (epochs, lr, seed, ...).

    Returns the loop's DistillResult; `result.student` is `model` at its best epoch.
    """
    batch = next(iter(train_loader))
    example = batch["inputs"] if isinstance(batch, dict) else batch[0]
    available = model_exits(model, example)
    exits = list(exits) if exits is not None else available
    for name in exits:
        if name not in available:
            raise StillroomError(
                f"the model has no exit {name!r}; its exits are: {', '.join(available)}"
            )
    if len(exits) < 2:
        raise StillroomError(f"self-distillation needs 2+ exits, got {exits}")
    if feature_weight > 0:
        if feature_layers is None and isinstance(model, MultiExitResNet):
            feature_layers, final_feature = model.feature_layers(hint_at)
        if feature_layers is None or final_feature is None:
            raise StillroomError(
                "feature_weight > 0 needs feature_layers (exit -> module name) and final_feature"
            )
        missing = [name for name in exits[:-1] if name not in feature_layers]
        if missing:
            raise StillroomError(f"feature_layers names no feature layer for exit {missing[0]!r}")
        feature_layers = {name: feature_layers[name] for name in exits[:-1]}
        check_feature_pairs(model, example, feature_layers, final_feature)
    if not 0.0 <= alpha < 1.0:
        # at alpha = 1 the deepest exit, the teacher of the others, would learn from nothing
        raise StillroomError(f"self_distill alpha must be in [0, 1), got {alpha}")
    terms = self_distillation_terms(
        exits,
        alpha=alpha,
        temperature=temperature,
        feature_weight=feature_weight,
        feature_layers=feature_layers,
        final_feature=final_feature,
    )
    taken = sorted({"alpha", "terms", "outputs"} & set(overrides))
    if taken:
        raise StillroomError(
            f"self_distill builds {', '.join(taken)} itself; pass alpha/temperature/feature_weight"
        )
    select = select or exits[-1]
    if select not in exits:
        raise StillroomError(
            f"select: the model has no exit {select!r}; its exits are: {', '.join(exits)}"
        )
    # named outputs: the loop's classic blend stays out; every term above is in `terms`
    train_args = replace(
        args or TrainArgs(),
        **overrides,
        alpha=None,
        terms=tuple(terms),
        outputs=dict.fromkeys(exits, "classification"),
        select=select,
    )
    return distill(
        None,
        model,
        train_loader,
        per_output_targets(val_loader, exits) if val_loader is not None else None,
        run_dir=run_dir,
        resume=resume,
        args=train_args,
    )


# ---------------------------------------------------------------- the recipe workflow


class SelfDistillSection(BaseModel):
    """The multi-exit network (a ResNet with an exit after every stage but the last) and the loss."""

    model_config = ConfigDict(extra="forbid")

    widths: list[int] = Field([16, 32, 64], min_length=2, description="channels per stage")
    blocks: list[int] = Field([1, 1, 1], description="residual blocks per stage")
    exit_width: int | None = Field(
        None, ge=1, description="channels of every exit's bottleneck; null: the deepest width"
    )
    alpha: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="weight of each shallow exit's KD term; 1 - alpha: each CE (< 1: the deepest "
        "exit learns from the labels alone)",
    )
    temperature: float = Field(3.0, gt=0, description="temperature of the KD terms")
    feature_weight: float = Field(
        0.0, ge=0, description="weight of each shallow exit's hint toward the deepest feature"
    )
    hint_at: Literal["map", "pooled"] = Field(
        "map",
        description="map: exits.i.bottleneck -> the last stage's map; pooled: exits.i.features "
        "-> pool",
    )
    select: str = Field(
        FINAL, description="the exit whose validation accuracy picks the best checkpoint"
    )

    def spec(self, exit_name: str | None = None) -> dict[str, Any]:
        spec = {"kind": "multiexit", "widths": self.widths, "blocks": self.blocks}
        return {**spec, "exit_width": self.exit_width, "exit": exit_name}


class SelfDistillRecipe(RecipeBase):
    """One multi-exit network trained with self-distillation, beside deep supervision and the
    plain network (method: self_distill)."""

    method: Literal["self_distill"] = "self_distill"
    name: str = "digits_self_distill"
    data: DataSection = DataSection()
    distill: TrainSection = Field(
        TrainSection(epochs=40, lr=0.01),
        description="training settings of every network (alpha etc. are in self_distill)",
    )
    self_distill: SelfDistillSection = SelfDistillSection()
    baseline: bool = Field(
        True, description="also train (b) deep supervision and (c) the plain network"
    )
    absent: ClassVar[dict[str, str]] = {
        key: f"a self_distill recipe has no '{key}' section: the network and its exits are in "
        "'self_distill'; remove it"
        for key in ("teacher", "student")
    }


@dataclass
class SelfDistillResult:
    run_dir: Path
    metric: str
    exits: dict[str, dict[str, Any]]
    """exit -> self_distilled, deeply_supervised (test accuracy), parameters, size_bytes, latency_ms."""
    scratch: dict[str, Any] | None
    settings: dict[str, Any]


def run_self_distill(
    recipe: SelfDistillRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> SelfDistillResult:
    """Train (a) self-distilled, (b) deeply supervised, (c) plain; write the per-exit table.
    A phase whose model.json exists is loaded on resume; a started one continues."""
    run_dir = Path(run_dir)
    section = recipe.self_distill
    splits, student_train = prepare_data(recipe)
    if splits.train.task != "classification":
        raise StillroomError(
            f"self-distillation needs classification data; '{recipe.data.source}' is "
            f"{splits.train.task}"
        )
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    names = exit_names(len(section.widths))
    if section.select not in names:
        raise StillroomError(
            f"self_distill.select: the network has no exit {section.select!r}; its exits are: "
            f"{', '.join(names)}"
        )
    # builds the network once: bad widths/blocks/inputs and unprojectable hints fail here
    probe = build_seeded(section.spec(), input_shape, num_outputs, recipe.seed)
    if section.feature_weight > 0:
        layers, final_feature = probe.feature_layers(section.hint_at)
        check_feature_pairs(probe, splits.train.inputs[:2], layers, final_feature)
    prepare_run_dir(run_dir, recipe, resume, force, (recipe.data.path,))

    meta = {"input_shape": list(input_shape), "num_outputs": num_outputs}
    batch, val = recipe.data.batch_size, make_loader(splits.val, 512, shuffle=False)
    settings = section.model_dump(exclude={"widths", "blocks", "exit_width", "select"})
    networks = {"self_distilled": settings}
    if recipe.baseline:
        networks["deeply_supervised"] = {"alpha": 0.0, "feature_weight": 0.0}
    trained: dict[str, MultiExitResNet] = {}
    for phase, loss in networks.items():
        folder = run_dir / phase
        if resume and is_complete(folder):
            trained[phase] = load_model(folder)[0]
            continue
        data = student_train if phase == "self_distilled" else labelled_only(student_train)
        result = self_distill(
            build_seeded(section.spec(), input_shape, num_outputs, recipe.seed),
            make_loader(data, batch, shuffle=True),
            val,
            alpha=loss["alpha"],
            temperature=section.temperature,
            feature_weight=loss["feature_weight"],
            hint_at=section.hint_at,
            run_dir=folder,
            resume=resume,
            args=recipe.train_args(
                recipe.distill, "classification", progress=progress, description=phase
            ),
            select=section.select,
        )
        for name in names:  # the standalone exits first: model.json last marks the phase done
            save_model(
                exit_model(result.student, name),
                section.spec(name),
                folder / "exits" / name,
                **meta,
            )
        save_model(result.student, section.spec(), folder, **meta)
        mark_complete(folder)
        trained[phase] = result.student

    scratch = None
    if recipe.baseline:
        plain = {"kind": "resnet", "widths": section.widths, "blocks": section.blocks}
        args = recipe.train_args(
            recipe.distill, "classification", alpha=0.0, progress=progress, description="scratch"
        )
        if resume and is_complete(run_dir / "scratch"):
            scratch = load_model(run_dir / "scratch")[0]
        else:
            scratch = train_phase(
                "scratch",
                run_dir,
                None,
                build_seeded(plain, input_shape, num_outputs, recipe.seed),
                plain,
                labelled_only(student_train),
                splits.val,
                args,
                batch,
                resume,
            )

    test = make_loader(splits.test, 512, shuffle=False)
    deployed = {name: exit_model(trained["self_distilled"], name) for name in names}
    latency = interleaved_latency(deployed, input_shape)
    exits = {}
    for name, model in deployed.items():
        weights = run_dir / "self_distilled" / "exits" / name / "model.safetensors"
        exits[name] = {
            phase: evaluate(exit_model(network, name), test, "classification")["accuracy"]
            for phase, network in trained.items()
        }
        exits[name].update(
            parameters=count_parameters(model),
            size_bytes=weights.stat().st_size,
            latency_ms=latency[name],
        )
    scratch_row = None
    if scratch is not None:  # the final exit's architecture: its costs are the final row's
        accuracy = evaluate(scratch, test, "classification")["accuracy"]
        scratch_row = {"accuracy": accuracy, "parameters": count_parameters(scratch)}
    result = SelfDistillResult(run_dir, "accuracy", exits, scratch_row, settings)
    _write_results(
        result, len(splits.test), count_parameters(trained["self_distilled"]), section.select
    )
    return result


def interleaved_latency(
    models: dict[str, nn.Module], input_shape: tuple[int, ...], rounds: int = 5
) -> dict[str, float]:
    """CPU milliseconds per single-sample forward of each model: the median over `rounds` of
    `stillroom.measure.latency_ms`, the models taking turns in every round, so that a burst of
    load on a shared machine hits every exit alike instead of the one measured at that moment."""
    seen: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            seen[name].append(latency_ms(model, input_shape, warmup=10, repeats=100))
    return {name: statistics.median(values) for name, values in seen.items()}


def _write_results(
    result: SelfDistillResult, test_samples: int, full_parameters: int, select: str
) -> None:
    payload = {
        "task": "classification",
        "metric": result.metric,
        "test_samples": test_samples,
        "settings": result.settings,
        "network_parameters": full_parameters,
        "exits": result.exits,
        "scratch": result.scratch,
    }
    atomic_write_json(result.run_dir / "results.json", payload)
    write_summary(summarize(result, select), result.run_dir)


def summarize(result: SelfDistillResult, select: str = FINAL) -> Summary:
    """One row per exit of the self-distilled network (its deeply supervised twin's accuracy
    beside it), then the plain network trained from labels alone."""
    models = [
        ModelResult(
            name=name,
            role="exit",
            metrics={
                "accuracy": row.get("self_distilled"),
                "deeply_supervised_accuracy": row.get("deeply_supervised"),
            },
            folder=f"self_distilled/exits/{name}",
            parameters=row["parameters"],
            size_bytes=row["size_bytes"],
            latency_ms=row["latency_ms"],
            teacher=FINAL if name != FINAL else "",
        )
        for name, row in result.exits.items()
    ]
    if result.scratch is not None:
        models.append(
            ModelResult(
                name="plain_scratch",
                role="baseline",
                metrics={"accuracy": result.scratch["accuracy"]},
                folder="scratch",
                parameters=result.scratch["parameters"],
                architecture=f"the {FINAL} exit's network, no exits",
            )
        )
    s = result.settings
    return Summary(
        method="self_distill",
        title=f"self-distillation: test accuracy of each exit run alone ({result.run_dir.name})",
        task="classification",
        metric="accuracy",
        higher_is_better=True,
        models=models,
        settings=s,
        notes=[
            f"alpha {s.get('alpha')}, T {s.get('temperature')}, feature_weight "
            f"{s.get('feature_weight')} ({s.get('hint_at')}); deeply supervised: CE on every "
            "exit, no distillation; plain_scratch: no exits, trained on labels alone"
        ],
        primary=select,
    )
