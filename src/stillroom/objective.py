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
discriminator) brings its own module, trained by the loop in alternation with the student.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.models import device_of
from stillroom.taps import Taps, feature_shapes
from stillroom.terms import (
    SOURCES,
    TOKEN_MASKS,
    BuildContext,
    StepOutputs,
    Term,
    TermSpec,
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
    "FEATURE_KINDS",
    "OUTPUT_KINDS",
    "RELATION_KINDS",
    "TAPPING_KINDS",
    "TERMS",
    "BuildContext",
    "ObjectiveStudent",
    "StepOutputs",
    "Term",
    "TermSpec",
    "build_objective",
    "check_layer_names",
    "classic_terms",
    "match_targets",
    "needs_example",
    "pick",
    "student_side",
    "tapped_layers",
    "teacher_side",
    "term_targets",
    "to_device",
]


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
}
"""Every term kind a recipe's `distill.terms` (or `TermSpec.kind`) may name."""

FEATURE_KINDS = ("hint", "attention_transfer", "hidden_state", "attention_map")
RELATION_KINDS = ("rkd_distance", "rkd_angle")
OUTPUT_KINDS = ("soft_target", "topk_soft_target", "regression", "dkd")
TAPPING_KINDS = (*FEATURE_KINDS, *RELATION_KINDS, "adversarial")


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
) -> list[Term]:
    """Turn specs into terms, sizing feature terms (and their projectors) from one example batch.

    output_tasks: the task of each named output when the models return dicts (multi-task heads).
    """
    unknown = [s.kind for s in specs if s.kind not in TERMS]
    if unknown:
        raise StillroomError(f"unknown term kind {unknown[0]!r}; available: {', '.join(TERMS)}")
    for spec in specs:
        if spec.source not in SOURCES:
            raise StillroomError(f"term '{spec.kind}': source must be one of {SOURCES}")
        if spec.kind == "token_kl" and spec.mask not in TOKEN_MASKS:
            raise StillroomError(f"term 'token_kl': mask must be one of {TOKEN_MASKS}")
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
