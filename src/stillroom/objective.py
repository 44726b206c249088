"""The distillation objective: a list of weighted terms, and TERMS, the one table of term kinds.

    loss = sum(term.weight * term.value for term in objective)

The classic recipe is two terms, `alpha * distillation + (1 - alpha) * hard_label`; feature,
attention, relational and decoupled terms are added to the same list. A term reads the student's
and teacher's outputs, the labels, and features captured by name at intermediate layers (taps).
Learned parts (FitNets projectors) live in `ObjectiveStudent`, trained with the student and never
part of the saved student.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.losses import (
    HARD_LABEL_TERMS,
    regression_distillation_loss,
    soft_target_loss,
    topk_soft_target_loss,
)
from stillroom.losses.dkd import decoupled_kd_loss
from stillroom.losses.features import (
    align_spatial,
    attention_map_kl,
    attention_transfer_loss,
    hidden_state_loss,
    hint_loss,
    make_projector,
    uniform_layer_map,
)
from stillroom.losses.relations import rkd_angle_loss, rkd_distance_loss
from stillroom.taps import Taps, feature_shapes


@dataclass(frozen=True)
class TermSpec:
    """One weighted term as a user declares it (recipe `distill.terms` or the Python API).

    kind: a key of TERMS. student / teacher: module names (as `named_modules()` reports them) whose
    outputs the term compares; None means the model outputs. A name ending in `.*` (e.g.
    `layers.*`) stands for the numbered children of a container, paired uniformly (TinyBERT's
    g(m) = m * N / M) or by `layer_map` [(student_index, teacher_index), ...].
    """

    kind: str
    weight: float = 1.0
    student: str | None = None
    teacher: str | None = None
    temperature: float = 4.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    p: float = 2.0
    similarity: str = "mse"
    layer_map: tuple[tuple[int, int], ...] | None = None
    name: str | None = None


@dataclass
class StepOutputs:
    """What the terms of one training step read."""

    student: torch.Tensor
    teacher: Any
    targets: torch.Tensor
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Term:
    """A built term: `compute(step) -> scalar`, weighted by `weight`, logged as `train/<name>`."""

    name: str
    weight: float
    compute: Callable[[StepOutputs], torch.Tensor]
    needs_teacher: bool
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    projector: nn.Module | None = None


@dataclass
class BuildContext:
    """Shapes and models a builder may need: features are sized from one example batch."""

    task: str
    student_shapes: dict[str, tuple[int, ...]]
    teacher_shapes: dict[str, tuple[int, ...]]


def _layer(name: str | None, fallback: str) -> str:
    return name if name else fallback


def _output_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    kind = spec.kind
    if kind == "soft_target":
        temperature = spec.temperature

        def compute(step: StepOutputs) -> torch.Tensor:
            return soft_target_loss(step.student, step.teacher, temperature)

    elif kind == "topk_soft_target":
        temperature = spec.temperature

        def compute(step: StepOutputs) -> torch.Tensor:
            return topk_soft_target_loss(step.student, step.teacher, temperature, class_dim=1)

    elif kind == "regression":

        def compute(step: StepOutputs) -> torch.Tensor:
            return regression_distillation_loss(step.student, step.teacher)

    else:
        assert kind == "dkd"
        alpha, beta, temperature = spec.dkd_alpha, spec.dkd_beta, spec.temperature

        def compute(step: StepOutputs) -> torch.Tensor:
            return decoupled_kd_loss(
                step.student, step.teacher, step.targets, alpha, beta, temperature
            )

    return [Term(spec.name or kind, spec.weight, compute, needs_teacher=True)]


def _hard_label_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    loss = HARD_LABEL_TERMS[ctx.task]
    return [
        Term(
            spec.name or "hard_label",
            spec.weight,
            lambda step: loss(step.student, step.targets),
            False,
        )
    ]


def _pairs(spec: TermSpec, ctx: BuildContext) -> list[tuple[str, str]]:
    """(student layer, teacher layer) pairs, expanding `container.*` names."""
    if spec.student is None or spec.teacher is None:
        raise StillroomError(
            f"term '{spec.kind}' compares layers: give both student and teacher module names"
        )
    if spec.student.endswith(".*") != spec.teacher.endswith(".*"):
        raise StillroomError(
            f"term '{spec.kind}': '{spec.student}' and '{spec.teacher}' must both name a container "
            "with '.*' or both name one module"
        )
    if not spec.student.endswith(".*"):
        return [(spec.student, spec.teacher)]
    student_layers = _children(spec.student, ctx.student_shapes)
    teacher_layers = _children(spec.teacher, ctx.teacher_shapes)
    mapping = spec.layer_map or tuple(uniform_layer_map(len(student_layers), len(teacher_layers)))
    for s, t in mapping:
        if not (0 <= s < len(student_layers) and 0 <= t < len(teacher_layers)):
            raise StillroomError(
                f"term '{spec.kind}': layer_map pair ({s}, {t}) is out of range; the student has "
                f"{len(student_layers)} and the teacher {len(teacher_layers)} layers under those names"
            )
    return [(student_layers[s], teacher_layers[t]) for s, t in mapping]


def _children(pattern: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    prefix = re.escape(pattern[:-2])
    found = sorted(
        (int(m.group(1)), name) for name in shapes if (m := re.fullmatch(prefix + r"\.(\d+)", name))
    )
    return [name for _, name in found]


def _term_name(spec: TermSpec, student_layer: str, teacher_layer: str) -> str:
    if spec.name and not (spec.student or "").endswith(".*"):
        return spec.name
    return f"{spec.name or spec.kind}:{student_layer}->{teacher_layer}"


def _feature_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    terms = []
    for student_layer, teacher_layer in _pairs(spec, ctx):
        s_shape, t_shape = ctx.student_shapes[student_layer], ctx.teacher_shapes[teacher_layer]
        projector = None
        if spec.kind == "hint":
            try:
                projector = make_projector(s_shape, t_shape)
            except ValueError as err:
                raise StillroomError(
                    f"term '{spec.kind}' {student_layer} -> {teacher_layer}: {err}"
                ) from None
            if isinstance(projector, nn.Identity):
                projector = None
        compute = _feature_compute(spec, student_layer, teacher_layer, t_shape)
        terms.append(
            Term(
                _term_name(spec, student_layer, teacher_layer),
                spec.weight,
                compute,
                needs_teacher=True,
                student_layers=(student_layer,),
                teacher_layers=(teacher_layer,),
                projector=projector,
            )
        )
    return terms


def _feature_compute(
    spec: TermSpec, student_layer: str, teacher_layer: str, teacher_shape: tuple[int, ...]
) -> Callable[[StepOutputs], torch.Tensor]:
    kind, p, similarity = spec.kind, spec.p, spec.similarity

    projected = f"projected:{_term_name(spec, student_layer, teacher_layer)}"

    def compute(step: StepOutputs) -> torch.Tensor:
        # a hint term with a projector reads the projected feature ObjectiveStudent adds
        s = step.student_features.get(projected, step.student_features[student_layer])
        t = step.teacher_features[teacher_layer]
        if kind in ("hint", "attention_transfer") and s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            s = align_spatial(s, tuple(t.shape[-2:]))
        if kind == "hint":
            return hint_loss(s, t)
        if kind == "attention_transfer":
            return attention_transfer_loss(s, t, p=p)
        if kind == "hidden_state":
            return hidden_state_loss(s, t, kind=similarity)
        assert kind == "attention_map"
        return attention_map_kl(s, t)

    return compute


def _relation_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    loss = rkd_distance_loss if spec.kind == "rkd_distance" else rkd_angle_loss
    student_layer, teacher_layer = spec.student, spec.teacher

    def embedding(step: StepOutputs, which: str) -> torch.Tensor:
        layer = student_layer if which == "student" else teacher_layer
        if layer is None:
            out = step.student if which == "student" else step.teacher
        else:
            out = (step.student_features if which == "student" else step.teacher_features)[layer]
        return out.flatten(1)

    def compute(step: StepOutputs) -> torch.Tensor:
        return loss(embedding(step, "student"), embedding(step, "teacher"))

    where = f"{_layer(student_layer, 'outputs')}->{_layer(teacher_layer, 'outputs')}"
    return [
        Term(
            spec.name or f"{spec.kind}:{where}",
            spec.weight,
            compute,
            needs_teacher=True,
            student_layers=(student_layer,) if student_layer else (),
            teacher_layers=(teacher_layer,) if teacher_layer else (),
        )
    ]


TERMS: dict[str, Callable[[TermSpec, BuildContext], list[Term]]] = {
    "soft_target": _output_term,  # Hinton et al. 2015: KL(teacher_T || student_T) * T**2
    "topk_soft_target": _output_term,  # the same from a top-k store: k classes + the tail mass
    "regression": _output_term,  # MSE to the teacher's outputs
    "dkd": _output_term,  # Zhao et al. 2022: alpha * TCKD + beta * NCKD
    "hard_label": _hard_label_term,  # cross-entropy (classification) or MSE (regression) to labels
    "hint": _feature_term,  # Romero et al. 2015 (FitNets), learned projector when widths differ
    "attention_transfer": _feature_term,  # Zagoruyko & Komodakis 2017
    "hidden_state": _feature_term,  # DistilBERT (cosine) / TinyBERT (MSE) hidden states
    "attention_map": _feature_term,  # TinyBERT / MiniLM attention-probability KL
    "rkd_distance": _relation_term,  # Park et al. 2019
    "rkd_angle": _relation_term,  # Park et al. 2019
}
"""Every term kind a recipe's `distill.terms` (or `TermSpec.kind`) may name."""

FEATURE_KINDS = ("hint", "attention_transfer", "hidden_state", "attention_map")
RELATION_KINDS = ("rkd_distance", "rkd_angle")
OUTPUT_KINDS = ("soft_target", "topk_soft_target", "regression", "dkd")


def classic_terms(
    alpha: float, temperature: float, loss: str, dkd_alpha: float = 1.0, dkd_beta: float = 8.0
) -> list[TermSpec]:
    """The blend `alpha * distillation + (1 - alpha) * hard_label` as two terms."""
    return [
        TermSpec(
            loss,
            alpha,
            temperature=temperature,
            dkd_alpha=dkd_alpha,
            dkd_beta=dkd_beta,
            name="distillation",
        ),
        TermSpec("hard_label", weight=1.0 - alpha, name="hard_label"),
    ]


def tapped_layers(specs: list[TermSpec]) -> tuple[list[str], list[str]]:
    """Layer names (possibly `x.*` patterns) the specs read on the student and on the teacher."""
    student, teacher = [], []
    for spec in specs:
        if spec.kind in FEATURE_KINDS + RELATION_KINDS:
            if spec.student:
                student.append(spec.student)
            if spec.teacher:
                teacher.append(spec.teacher)
    return student, teacher


def _resolve(patterns: list[str], model: nn.Module) -> list[str]:
    """Module names, with `container.*` expanded to the container's numbered children."""
    names = [n for n, _ in model.named_modules()]
    resolved: list[str] = []
    for pattern in patterns:
        if pattern.endswith(".*"):
            children = _children(pattern, dict.fromkeys(names, ()))
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


def _shapes(
    model: nn.Module | None, example: torch.Tensor | None, names: list[str]
) -> dict[str, tuple[int, ...]]:
    if not names:
        return {}
    assert model is not None and example is not None
    device = next(model.parameters()).device  # the teacher may already sit on the accelerator
    return feature_shapes(model, example.to(device), names)


def build_objective(
    specs: list[TermSpec],
    task: str,
    student: nn.Module,
    teacher_module: nn.Module | None,
    example_inputs: torch.Tensor,
) -> list[Term]:
    """Turn specs into terms, sizing feature terms (and their projectors) from one example batch."""
    unknown = [s.kind for s in specs if s.kind not in TERMS]
    if unknown:
        raise StillroomError(f"unknown term kind {unknown[0]!r}; available: {', '.join(TERMS)}")
    student_patterns, teacher_patterns = tapped_layers([s for s in specs if s.weight > 0])
    student_names = _resolve(student_patterns, student)
    if teacher_patterns and teacher_module is None:
        raise StillroomError(
            "feature terms need a live teacher module (its intermediate layers run at every step); "
            "a cached teacher only holds its outputs"
        )
    teacher_names = _resolve(teacher_patterns, teacher_module) if teacher_patterns else []
    ctx = BuildContext(
        task,
        _shapes(student, example_inputs, student_names),
        _shapes(teacher_module, example_inputs, teacher_names),
    )
    terms: list[Term] = []
    for spec in specs:
        # weight-0 output terms are still built: the loop logs them when it can compute them
        if spec.weight > 0 or spec.kind not in FEATURE_KINDS + RELATION_KINDS:
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
                assert len(term.student_layers) == 1
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
