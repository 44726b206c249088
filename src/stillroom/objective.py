"""The distillation objective: a list of weighted terms, and TERMS, the one table of term kinds.

    loss = sum(term.weight * term.value for term in objective)

The classic recipe is two terms, `alpha * distillation + (1 - alpha) * hard_label`; feature,
attention, relational, decoupled, token-level and adversarial terms are added to the same list. A
term reads the student's and teacher's outputs, the labels, and features captured by name at
intermediate layers (taps). Models may return a dict of named outputs (multi-task heads, the exits
of a self-distilled network): a term then names the output it reads (`output`), and may read its
"teacher" side from the student itself (`source="student"`, detached), which is how shallow exits
learn from the deepest one. Learned parts (FitNets projectors) live in `ObjectiveStudent`, trained
with the student and never part of the saved student; a term with a critic (the adversarial
discriminator) brings its own module, trained in alternation with the student
(stillroom.train.critics: one call per batch in the loop).

Each kind's parameters are its own spec class (SoftTargetSpec, HintSpec, DkdSpec, ...: validated
pydantic dataclasses over a common TermSpec), and a recipe's `distill.terms` entries are parsed
straight into them, discriminated on `kind`: the spec a recipe validates is the spec the builders
read, each parameter and its default declared once, and a parameter the kind lacks is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal, Union, get_args

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass as spec_dataclass
from torch import nn

from stillroom.dense.terms import box_term, cwd_term, heatmap_term
from stillroom.errors import StillroomError
from stillroom.models import device_of
from stillroom.taps import Taps, feature_shapes
from stillroom.terms import (
    BuildContext,
    StepOutputs,
    Term,
    adversarial_term,
    dkd_term,
    feature_term,
    hard_label_term,
    match_targets,
    numbered_children,
    pick,
    regression_term,
    relation_term,
    soft_target_term,
    student_side,
    teacher_side,
    term_targets,
    to_device,
    token_term,
    topk_soft_target_term,
)

__all__ = [
    "DEFAULT_TEMPERATURE",
    "FEATURE_KINDS",
    "OUTPUT_KINDS",
    "RELATION_KINDS",
    "SPECS",
    "TAPPING_KINDS",
    "TERMS",
    "AnyTermSpec",
    "BuildContext",
    "ObjectiveStudent",
    "StepOutputs",
    "Term",
    "TermSpec",
    "build_objective",
    "check_layer_names",
    "classic_terms",
    "field_default",
    "match_targets",
    "needs_example",
    "pick",
    "spec_problem",
    "student_side",
    "tapped_layers",
    "teacher_side",
    "term_targets",
    "to_device",
    "with_temperature",
]


DEFAULT_TEMPERATURE = 4.0
"""Hinton's T for runs that set none (TrainArgs, distill.temperature) and terms that leave theirs
unset."""

_SPEC = ConfigDict(extra="forbid")


@spec_dataclass(frozen=True, config=_SPEC)
class TermSpec:
    """One weighted term as a user declares it (recipe `distill.terms` or the Python API); the
    fields every kind has. `TermSpec(kind, weight, ...)` builds the spec of that kind (HintSpec,
    DkdSpec, ... below); a parameter the kind does not have is refused.

    student / teacher: module names (as `named_modules()` reports them) whose outputs the term
    compares; None means the model outputs. A name ending in `.*` (e.g. `layers.*`) stands for the
    numbered children of a container, paired uniformly (TinyBERT's g(m) = m * N / M) or by a
    feature term's `layer_map`.
    """

    kind: str
    weight: float = Field(1.0, ge=0, description="the term's weight in the summed loss")
    student: str | None = Field(
        None,
        description="student module name (named_modules()); 'layers.*' pairs numbered children",
    )
    teacher: str | None = Field(None, description="teacher module name, as for student")
    name: str | None = Field(
        None, description="log name (train/<name>); default kind:student->teacher"
    )
    output: str | None = Field(
        None, description="models with named outputs: the student output the term reads"
    )
    teacher_output: str | None = Field(
        None,
        description="the teacher (or, with source student, the student) output; default output",
    )
    source: Literal["teacher", "student"] = Field(
        "teacher",
        description="where the other side comes from: the teacher, or the student's own output/layer "
        "(detached; self-distillation)",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> TermSpec:
        if cls is not TermSpec:
            return object.__new__(cls)
        # TermSpec("hint", ...) is a HintSpec: the kind picks the class, as Path picks PosixPath.
        # Python then runs __init__ once more on the instance: the same arguments, valid again
        kind = args[0] if args else kwargs.get("kind")
        if kind not in SPECS:
            raise StillroomError(f"unknown term kind {kind!r}; available: {', '.join(SPECS)}")
        try:
            return SPECS[kind](*args, **kwargs)
        except ValidationError as err:
            raise StillroomError(f"term {kind!r}: {spec_problem(kind, err.errors()[0])}") from None


_Task = Literal["classification", "regression", "language_modeling", "embedding"]


@spec_dataclass(frozen=True, config=_SPEC)
class _Softened(TermSpec):
    temperature: float | None = Field(
        None, gt=0, description="softens both sides' logits; default the run's distill.temperature"
    )


@spec_dataclass(frozen=True, config=_SPEC)
class SoftTargetSpec(_Softened):
    """Hinton et al. 2015: KL(teacher_T || student_T) * T**2."""

    kind: Literal["soft_target"] = "soft_target"


@spec_dataclass(frozen=True, config=_SPEC)
class TopKSoftTargetSpec(_Softened):
    """The soft-target term from a top-k store: k probabilities plus the tail mass."""

    kind: Literal["topk_soft_target"] = "topk_soft_target"


@spec_dataclass(frozen=True, config=_SPEC)
class RegressionSpec(TermSpec):
    """MSE to the teacher's outputs."""

    kind: Literal["regression"] = "regression"
    task: _Task | None = Field(None, description="the task of `output` (default: the data's task)")


@spec_dataclass(frozen=True, config=_SPEC)
class DkdSpec(_Softened):
    """Zhao et al. 2022: dkd_alpha * TCKD + dkd_beta * NCKD."""

    kind: Literal["dkd"] = "dkd"
    dkd_alpha: float = Field(1.0, ge=0, description="weight of the target-class term")
    dkd_beta: float = Field(8.0, ge=0, description="weight of the non-target-class term")


@spec_dataclass(frozen=True, config=_SPEC)
class HardLabelSpec(TermSpec):
    """Cross-entropy (classification) or MSE (regression) to the labels."""

    kind: Literal["hard_label"] = "hard_label"
    task: _Task | None = Field(None, description="the task of `output` (default: the data's task)")


@spec_dataclass(frozen=True, config=_SPEC)
class _Feature(TermSpec):
    """A term between two named layers (both names required)."""

    layer_map: tuple[tuple[int, int], ...] | None = Field(
        None, description="explicit (student index, teacher index) pairs for 'x.*' names"
    )

    @model_validator(mode="after")
    def _layers_given(self) -> _Feature:
        if not (self.student and self.teacher):
            raise ValueError(
                f"a '{self.kind}' term needs both 'student' and 'teacher' module names"
            )
        return self


@spec_dataclass(frozen=True, config=_SPEC)
class HintSpec(_Feature):
    """Romero et al. 2015 (FitNets): MSE of features, a learned projector when widths differ."""

    kind: Literal["hint"] = "hint"


@spec_dataclass(frozen=True, config=_SPEC)
class AttentionTransferSpec(_Feature):
    """Zagoruyko & Komodakis 2017: distance of normalised spatial attention maps."""

    kind: Literal["attention_transfer"] = "attention_transfer"
    p: float = Field(2.0, gt=0, description="power of the attention map")


@spec_dataclass(frozen=True, config=_SPEC)
class HiddenStateSpec(_Feature):
    """DistilBERT (cosine) / TinyBERT (MSE) hidden states."""

    kind: Literal["hidden_state"] = "hidden_state"
    similarity: Literal["mse", "cosine"] = Field("mse", description="MSE or 1 - cosine")


@spec_dataclass(frozen=True, config=_SPEC)
class AttentionMapSpec(_Feature):
    """TinyBERT / MiniLM: KL of attention probabilities."""

    kind: Literal["attention_map"] = "attention_map"


@spec_dataclass(frozen=True, config=_SPEC)
class RkdDistanceSpec(TermSpec):
    """Park et al. 2019: pairwise distances between samples' embeddings."""

    kind: Literal["rkd_distance"] = "rkd_distance"


@spec_dataclass(frozen=True, config=_SPEC)
class RkdAngleSpec(TermSpec):
    """Park et al. 2019: angles between triplets of samples' embeddings."""

    kind: Literal["rkd_angle"] = "rkd_angle"


@spec_dataclass(frozen=True, config=_SPEC)
class TokenKlSpec(_Softened):
    """GKD (Agarwal et al. 2024): forward/reverse KL or generalized JSD over (N, L, V) tokens."""

    kind: Literal["token_kl"] = "token_kl"
    beta: float = Field(
        0.0, ge=0, le=1, description="0 forward KL, 1 reverse KL, between: generalized JSD"
    )
    chunk_size: int | None = Field(
        None, ge=1, description="positions per chunk (bounds fp32 memory)"
    )
    mask: Literal["labels", "attention", "none"] = Field(
        "labels", description="which tokens count (labels != -100, attention_mask, all)"
    )


@spec_dataclass(frozen=True, config=_SPEC)
class AdversarialSpec(_Softened):
    """Xu et al. 2018: a discriminator the student learns to fool, over outputs or two layers."""

    kind: Literal["adversarial"] = "adversarial"
    hidden: int = Field(64, ge=1, description="discriminator hidden width")
    critic_lr: float = Field(1e-3, gt=0, description="discriminator learning rate")

    @model_validator(mode="after")
    def _both_or_no_layers(self) -> AdversarialSpec:
        if bool(self.student) != bool(self.teacher):
            raise ValueError(
                "an 'adversarial' term compares outputs (no names) or two layers (both names)"
            )
        return self


@spec_dataclass(frozen=True, config=_SPEC)
class CwdSpec(_Softened):
    """Shu et al. 2021: KL of each channel's spatial softmax, over outputs or two layers."""

    kind: Literal["cwd"] = "cwd"

    @model_validator(mode="after")
    def _both_or_no_layers(self) -> CwdSpec:
        if bool(self.student) != bool(self.teacher):
            raise ValueError("a 'cwd' term compares outputs (no names) or two layers (both names)")
        return self


@spec_dataclass(frozen=True, config=_SPEC)
class HeatmapSpec(TermSpec):
    """A detection head's class heatmaps: BCE to the teacher's sigmoid(logits / T), T**2."""

    kind: Literal["heatmap"] = "heatmap"
    temperature: float = Field(1.0, gt=0, description="softens both heatmaps' logits")


@spec_dataclass(frozen=True, config=_SPEC)
class BoxSpec(TermSpec):
    """A detection head's box sizes: L1 to the teacher's, weighted by its heatmap confidence."""

    kind: Literal["box"] = "box"


SPECS: dict[str, type[TermSpec]] = {
    get_args(cls.__pydantic_fields__["kind"].annotation)[0]: cls
    for cls in (
        SoftTargetSpec,
        TopKSoftTargetSpec,
        RegressionSpec,
        DkdSpec,
        HardLabelSpec,
        HintSpec,
        AttentionTransferSpec,
        HiddenStateSpec,
        AttentionMapSpec,
        RkdDistanceSpec,
        RkdAngleSpec,
        TokenKlSpec,
        AdversarialSpec,
        CwdSpec,
        HeatmapSpec,
        BoxSpec,
    )
}
"""The spec class of every term kind (stillroom.objective.TERMS holds the same keys)."""

AnyTermSpec = Annotated[Union[tuple(SPECS.values())], Field(discriminator="kind")]  # noqa: UP007
"""A term section of a recipe: the spec of the kind its `kind` names."""


def spec_problem(kind: str, first: Any) -> str:
    """One of pydantic's errors (`err.errors()[0]`, loc within the spec) of a term spec as one
    line; the recipe loader adds the field's path."""
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        owners = [k for k, spec in SPECS.items() if field in spec.__pydantic_fields__]
        owned = f" (a field of {', '.join(owners)})" if owners else ""
        return f"{kind} has no field '{field}'{owned}"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}" if field else message


def field_default(spec_class: type[TermSpec], name: str) -> Any:
    """The default a spec class declares for `name` (for sections that mirror one field)."""
    return spec_class.__pydantic_fields__[name].default


def with_temperature(spec: TermSpec, temperature: float) -> TermSpec:
    """`spec` with an unset temperature taken from the run's."""
    if isinstance(spec, _Softened) and spec.temperature is None:
        return replace(spec, temperature=temperature)
    return spec


TERMS: dict[str, Callable[[TermSpec, BuildContext], list[Term]]] = {
    "soft_target": soft_target_term,  # Hinton et al. 2015: KL(teacher_T || student_T) * T**2
    "topk_soft_target": topk_soft_target_term,  # the same from a top-k store: k + the tail mass
    "regression": regression_term,  # MSE to the teacher's outputs
    "dkd": dkd_term,  # Zhao et al. 2022: alpha * TCKD + beta * NCKD
    "hard_label": hard_label_term,  # cross-entropy (classification) or MSE (regression) to labels
    "hint": feature_term,  # Romero et al. 2015 (FitNets), learned projector when widths differ
    "attention_transfer": feature_term,  # Zagoruyko & Komodakis 2017
    "hidden_state": feature_term,  # DistilBERT (cosine) / TinyBERT (MSE) hidden states
    "attention_map": feature_term,  # TinyBERT / MiniLM attention-probability KL
    "rkd_distance": relation_term,  # Park et al. 2019
    "rkd_angle": relation_term,  # Park et al. 2019
    "token_kl": token_term,  # GKD (Agarwal et al. 2024): forward/reverse KL, generalized JSD
    "adversarial": adversarial_term,  # Xu et al. 2018: a discriminator the student learns to fool
    "cwd": cwd_term,  # Shu et al. 2021: channel-wise distillation of dense maps (outputs, layers)
    "heatmap": heatmap_term,  # a detection head's class heatmaps (per-cell soft targets)
    "box": box_term,  # a detection head's box sizes, where the teacher sees objects
}
"""Every term kind a recipe's `distill.terms` (or `TermSpec.kind`) may name."""
assert TERMS.keys() == SPECS.keys(), "every term kind has one spec class and one builder"

FEATURE_KINDS = ("hint", "attention_transfer", "hidden_state", "attention_map")
RELATION_KINDS = ("rkd_distance", "rkd_angle")
OUTPUT_KINDS = ("soft_target", "topk_soft_target", "regression", "dkd")
TAPPING_KINDS = (*FEATURE_KINDS, *RELATION_KINDS, "adversarial", "cwd")


def classic_terms(
    alpha: float,
    temperature: float,
    loss: str,
    dkd_alpha: float | None = None,
    dkd_beta: float | None = None,
) -> list[TermSpec]:
    """The blend `alpha * distillation + (1 - alpha) * hard_label` as two terms. The run-wide
    knobs go to the `loss` kind that has them (temperature: not regression; dkd_*: dkd only;
    None: the kind's default)."""
    given = {"temperature": temperature, "dkd_alpha": dkd_alpha, "dkd_beta": dkd_beta}
    declared = SPECS[loss].__pydantic_fields__
    fields = {k: v for k, v in given.items() if v is not None and k in declared}
    return [
        TermSpec(loss, alpha, name="distillation", **fields),
        HardLabelSpec(weight=1.0 - alpha, name="hard_label"),
    ]


def needs_example(specs: list[TermSpec]) -> bool:
    """Whether building these terms needs one example batch (to size features or a critic)."""
    student, teacher = tapped_layers(specs)
    return bool(student or teacher) or any(s.kind == "adversarial" and s.weight > 0 for s in specs)


def tapped_layers(specs: list[TermSpec]) -> tuple[list[str], list[str]]:
    """Layer names (possibly `x.*` patterns) the specs read on the student and on the teacher."""
    student, teacher = [], []
    for spec in specs:
        if spec.kind in TAPPING_KINDS:
            if spec.student:
                student.append(spec.student)
            if spec.teacher:
                # self-distillation reads both layers from the student
                (student if spec.source == "student" else teacher).append(spec.teacher)
    return student, teacher


def _resolve(patterns: list[str], model: nn.Module) -> list[str]:
    """Module names, with `container.*` expanded to the container's numbered children."""
    names = [n for n, _ in model.named_modules()]
    resolved: list[str] = []
    for pattern in patterns:
        if pattern.endswith(".*"):
            children = numbered_children(pattern, dict.fromkeys(names, ()))
            if not children:
                raise StillroomError(
                    f"'{pattern}' matches no numbered children; list module names with "
                    "stillroom.taps.layer_names(model)"
                )
            resolved += children
        else:
            resolved.append(pattern)
    return list(dict.fromkeys(resolved))


def check_layer_names(model: nn.Module, patterns: list[str]) -> None:
    """Raise the fix-it error (closest valid names) for a layer name `model` does not have."""
    Taps(model, _resolve(patterns, model))  # validates the names; never attached


def _shapes(model: nn.Module | None, example: Any, names: list[str]) -> dict[str, tuple[int, ...]]:
    if not names:
        return {}
    assert model is not None and example is not None
    device = device_of(model)  # the teacher may already sit on the accelerator
    return feature_shapes(model, to_device(example, device), names)


def _example_outputs(model: nn.Module, example: Any) -> Any:
    """The model's outputs on one batch (no_grad, eval mode, training flags restored)."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(to_device(example, device_of(model)))
    finally:
        for module, flag in flags.items():
            module.train(flag)


def build_objective(
    specs: list[TermSpec],
    task: str,
    student: nn.Module,
    teacher_module: nn.Module | None,
    example_inputs: Any,
    output_tasks: dict[str, str] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[Term]:
    """Turn specs into terms, sizing feature terms (and their projectors) from one example batch.

    output_tasks: the task of each named output when the models return dicts (multi-task heads).
    temperature: the run's, for terms that leave theirs unset.
    """
    specs = [with_temperature(spec, temperature) for spec in specs]
    student_patterns, teacher_patterns = tapped_layers([s for s in specs if s.weight > 0])
    student_names = _resolve(student_patterns, student)
    if teacher_patterns and teacher_module is None:
        raise StillroomError(
            "feature terms need a live teacher module (its intermediate layers run at every step); "
            "a cached teacher only holds its outputs"
        )
    teacher_names = _resolve(teacher_patterns, teacher_module) if teacher_patterns else []
    reads_outputs = any(
        s.kind == "adversarial" and s.student is None and s.weight > 0 for s in specs
    )
    ctx = BuildContext(
        task,
        _shapes(student, example_inputs, student_names),
        _shapes(teacher_module, example_inputs, teacher_names),
        dict(output_tasks or {}),
        _example_outputs(student, example_inputs) if reads_outputs else None,
    )
    terms: list[Term] = []
    for spec in specs:
        # weight-0 output terms are still built: the loop logs them when it can compute them
        if spec.weight > 0 or spec.kind not in TAPPING_KINDS:
            terms += TERMS[spec.kind](spec, ctx)
    names = [t.name for t in terms]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise StillroomError(
            f"two terms are both named {sorted(duplicated)[0]!r}; give one a distinct name"
        )
    return terms


class ObjectiveStudent(nn.Module):
    """The student plus what training needs around it: taps on its layers and the projectors.

    forward(inputs) -> (outputs, features): features maps each tapped layer name to its output,
    projected to the teacher's width where a hint term needs it. Only `student` is ever saved as the
    model; projectors are checkpointed for resume and dropped afterwards.
    """

    def __init__(self, student: nn.Module, terms: list[Term]) -> None:
        super().__init__()
        self.student = student
        self.layers = list(dict.fromkeys(layer for t in terms for layer in t.student_layers))
        # ModuleDict keys may not contain '.': index projectors by position, map names to them
        self.projectors = nn.ModuleDict()
        self.projected: list[tuple[str, str, str]] = []  # (layer, projector key, feature key)
        for term in terms:
            if term.projector is not None:
                # the projected layer is the first; a self-distillation hint (source="student")
                # also taps its deeper layer, second, which is never projected
                key = f"p{len(self.projectors)}"
                self.projectors[key] = term.projector
                self.projected.append((term.student_layers[0], key, f"projected:{term.name}"))
        self.taps = Taps(student, self.layers) if self.layers else None

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.taps is None:
            return self.student(inputs), {}
        with self.taps:
            outputs = self.student(inputs)
            features = dict(self.taps.outputs)
        # projections happen inside forward so data-parallel wrappers see every parameter used
        for layer, key, feature_key in self.projected:
            features[feature_key] = self.projectors[key](features[layer])
        return outputs, features
