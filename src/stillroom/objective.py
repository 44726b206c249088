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

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError
from stillroom.losses import (
    HARD_LABEL_TERMS,
    IGNORE_INDEX,
    regression_distillation_loss,
    soft_target_loss,
    topk_soft_target_loss,
)
from stillroom.losses.adversarial import (
    Discriminator,
    adversarial_student_loss,
    discriminator_accuracy,
    discriminator_loss,
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
from stillroom.losses.sequence import token_distillation_loss
from stillroom.taps import Taps, feature_shapes


@dataclass(frozen=True)
class TermSpec:
    """One weighted term as a user declares it (recipe `distill.terms` or the Python API).

    kind: a key of TERMS. student / teacher: module names (as `named_modules()` reports them) whose
    outputs the term compares; None means the model outputs. A name ending in `.*` (e.g.
    `layers.*`) stands for the numbered children of a container, paired uniformly (TinyBERT's
    g(m) = m * N / M) or by `layer_map` [(student_index, teacher_index), ...].
    output / teacher_output: keys into dict outputs (teacher_output defaults to output).
    source: "teacher", or "student" to read the other side from the student's own outputs or
    layers, detached (self-distillation). task: the task of `output` for hard_label terms.
    beta, chunk_size, mask: token_kl (generalized JSD; beta 0 = forward KL, 1 = reverse KL).
    hidden, critic_lr: adversarial (discriminator width and learning rate).
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
    output: str | None = None
    teacher_output: str | None = None
    source: str = "teacher"
    task: str | None = None
    beta: float = 0.0
    chunk_size: int | None = None
    mask: str = "labels"
    hidden: int = 64
    critic_lr: float = 1e-3


SOURCES = ("teacher", "student")
TOKEN_MASKS = ("labels", "attention", "none")


@dataclass
class StepOutputs:
    """What the terms of one training step read. Outputs and targets are tensors, or dicts of
    tensors keyed by output name; inputs are what the models were called with."""

    student: Any
    teacher: Any
    targets: Any
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: Any = None


def pick(outputs: Any, key: str | None, whose: str) -> Any:
    """The output a term reads: the whole output, or the entry `key` of a dict of outputs."""
    if key is None:
        if isinstance(outputs, dict):
            raise StillroomError(
                f"the {whose} returns several outputs ({', '.join(outputs)}); name the one a term "
                "reads with its `output` (and `teacher_output`)"
            )
        return outputs
    if not isinstance(outputs, dict):
        raise StillroomError(
            f"a term reads output '{key}' but the {whose} returns one {type(outputs).__name__}, "
            "not a dict of named outputs; drop the term's `output`"
        )
    if key not in outputs:
        raise StillroomError(f"the {whose} has no output '{key}'; it returns: {', '.join(outputs)}")
    return outputs[key]


def match_targets(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression heads emit (N, 1) for (N,) targets: view them alike."""
    if (
        isinstance(targets, torch.Tensor)
        and outputs.shape != targets.shape
        and outputs.numel() == targets.numel()
        and outputs.dim() == targets.dim() + 1
    ):
        return outputs.view(targets.shape)
    return outputs


def student_side(step: StepOutputs, spec: TermSpec) -> Any:
    return pick(step.student, spec.output, "student")


def teacher_side(step: StepOutputs, spec: TermSpec) -> Any:
    """The other side of a term: the teacher's output, or the student's own (detached: the deep
    exit teaches the shallow ones, it is not pulled toward them)."""
    key = spec.teacher_output or spec.output
    if spec.source == "student":
        return pick(step.student, key, "student").detach()
    return pick(step.teacher, key, "teacher")


def term_targets(step: StepOutputs, spec: TermSpec) -> torch.Tensor:
    """The labels of the output a term reads (per-output dicts for multi-task data)."""
    if isinstance(step.targets, dict):
        if spec.output not in step.targets:
            raise StillroomError(
                f"the batch has labels for {', '.join(step.targets)} but a term reads output "
                f"'{spec.output}'"
            )
        return step.targets[spec.output]
    return step.targets


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
    # a second player trained in alternation (the adversarial discriminator):
    # critic_compute(step with the student detached) -> (critic loss, critic accuracy)
    critic: nn.Module | None = None
    critic_compute: Callable[[StepOutputs], tuple[torch.Tensor, torch.Tensor]] | None = None
    critic_lr: float = 1e-3


@dataclass
class BuildContext:
    """Shapes and models a builder may need: features are sized from one example batch."""

    task: str
    student_shapes: dict[str, tuple[int, ...]]
    teacher_shapes: dict[str, tuple[int, ...]]
    output_tasks: dict[str, str] = field(default_factory=dict)
    student_outputs: Any = None  # the student's outputs on the example batch (adversarial sizing)

    def shapes_of(self, spec: TermSpec, side: str) -> dict[str, tuple[int, ...]]:
        """Layer shapes of the model a term's `side` ("student"/"teacher") reads."""
        return (
            self.student_shapes
            if side == "student" or spec.source == "student"
            else (self.teacher_shapes)
        )


def _layer(name: str | None, fallback: str) -> str:
    return name if name else fallback


def _output_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    kind, temperature = spec.kind, spec.temperature
    task = spec.task or ctx.output_tasks.get(spec.output or "", ctx.task)

    def sides(step: StepOutputs) -> tuple[torch.Tensor, Any]:
        return student_side(step, spec), teacher_side(step, spec)

    if kind == "soft_target":

        def compute(step: StepOutputs) -> torch.Tensor:
            return soft_target_loss(*sides(step), temperature)

    elif kind == "topk_soft_target":

        def compute(step: StepOutputs) -> torch.Tensor:
            return topk_soft_target_loss(*sides(step), temperature, class_dim=1)

    elif kind == "regression":

        def compute(step: StepOutputs) -> torch.Tensor:
            student, teacher = sides(step)
            if task == "regression":  # (N, 1) heads against (N,) targets from a cache
                student, teacher = match_targets(student, teacher), match_targets(teacher, student)
            return regression_distillation_loss(student, teacher)

    else:
        assert kind == "dkd"
        alpha, beta = spec.dkd_alpha, spec.dkd_beta

        def compute(step: StepOutputs) -> torch.Tensor:
            student, teacher = sides(step)
            return decoupled_kd_loss(
                student, teacher, term_targets(step, spec), alpha, beta, temperature
            )

    return [Term(spec.name or kind, spec.weight, compute, needs_teacher=spec.source == "teacher")]


def _hard_label_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    task = spec.task or ctx.output_tasks.get(spec.output or "", ctx.task)
    loss = HARD_LABEL_TERMS[task]

    def compute(step: StepOutputs) -> torch.Tensor:
        targets = term_targets(step, spec)
        return loss(match_targets(student_side(step, spec), targets), targets)

    return [Term(spec.name or "hard_label", spec.weight, compute, False)]


def _token_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    beta, temperature, chunk_size, mask_from = (
        spec.beta,
        spec.temperature,
        spec.chunk_size,
        spec.mask,
    )

    def compute(step: StepOutputs) -> torch.Tensor:
        if mask_from == "labels":
            mask = term_targets(step, spec) != IGNORE_INDEX
        elif mask_from == "attention":
            mask = step.inputs["attention_mask"].bool()
        else:
            mask = None
        return token_distillation_loss(
            student_side(step, spec),
            teacher_side(step, spec),
            mask,
            beta=beta,
            temperature=temperature,
            chunk_size=chunk_size,
        )

    return [
        Term(spec.name or "token_kl", spec.weight, compute, needs_teacher=spec.source == "teacher")
    ]


def _adversarial_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    """A discriminator over the models' outputs (as softened probabilities) or a tapped layer."""
    student_layer, teacher_layer, temperature = spec.student, spec.teacher, spec.temperature
    if (student_layer is None) != (teacher_layer is None):
        raise StillroomError(
            "an adversarial term compares outputs (no student/teacher names) or two layers "
            "(both names)"
        )
    if student_layer is None:
        reference = pick(ctx.student_outputs, spec.output, "student")
        width = reference[0].numel()
    else:
        s_shape = ctx.student_shapes[student_layer]
        t_shape = ctx.shapes_of(spec, "teacher")[teacher_layer]
        if s_shape[1:] != t_shape[1:]:
            raise StillroomError(
                f"adversarial term: student layer '{student_layer}' gives {s_shape[1:]} but "
                f"teacher layer '{teacher_layer}' gives {t_shape[1:]}; pick layers of one shape "
                "(or compare outputs)"
            )
        width = math.prod(s_shape[1:])
    critic = Discriminator(width, spec.hidden)

    def critic_input(step: StepOutputs, side: str) -> torch.Tensor:
        if student_layer is None:
            out = student_side(step, spec) if side == "student" else teacher_side(step, spec)
            # probabilities, not logits: logits carry an arbitrary offset the critic could use
            return F.softmax(out.float().flatten(1) / temperature, dim=1)
        if side == "student":
            return step.student_features[student_layer]
        features = step.student_features if spec.source == "student" else step.teacher_features
        return features[teacher_layer].detach()

    def compute(step: StepOutputs) -> torch.Tensor:
        return adversarial_student_loss(critic(critic_input(step, "student")))

    def critic_compute(step: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        d_teacher = critic(critic_input(step, "teacher"))
        d_student = critic(critic_input(step, "student").detach())
        return discriminator_loss(d_teacher, d_student), discriminator_accuracy(
            d_teacher, d_student
        )

    where = f"{_layer(student_layer, 'outputs')}->{_layer(teacher_layer, 'outputs')}"
    return [
        Term(
            spec.name or f"adversarial:{where}",
            spec.weight,
            compute,
            needs_teacher=spec.source == "teacher",
            student_layers=(student_layer,) if student_layer else (),
            teacher_layers=(teacher_layer,) if teacher_layer and spec.source == "teacher" else (),
            critic=critic,
            critic_compute=critic_compute,
            critic_lr=spec.critic_lr,
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
    teacher_layers = _children(spec.teacher, ctx.shapes_of(spec, "teacher"))
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
        s_shape = ctx.student_shapes[student_layer]
        t_shape = ctx.shapes_of(spec, "teacher")[teacher_layer]
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
        own = spec.source == "student"  # both layers are the student's (self-distillation)
        terms.append(
            Term(
                _term_name(spec, student_layer, teacher_layer),
                spec.weight,
                compute,
                needs_teacher=not own,
                student_layers=(student_layer, teacher_layer) if own else (student_layer,),
                teacher_layers=() if own else (teacher_layer,),
                projector=projector,
            )
        )
    return terms


def _feature_compute(
    spec: TermSpec, student_layer: str, teacher_layer: str, teacher_shape: tuple[int, ...]
) -> Callable[[StepOutputs], torch.Tensor]:
    kind, p, similarity, own = spec.kind, spec.p, spec.similarity, spec.source == "student"

    projected = f"projected:{_term_name(spec, student_layer, teacher_layer)}"

    def compute(step: StepOutputs) -> torch.Tensor:
        # a hint term with a projector reads the projected feature ObjectiveStudent adds
        s = step.student_features.get(projected, step.student_features[student_layer])
        t = (step.student_features if own else step.teacher_features)[teacher_layer]
        if own:  # the deeper layer teaches; it is not pulled toward the shallow one
            t = t.detach()
        if kind in ("hint", "attention_transfer") and s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            s = align_spatial(s, tuple(t.shape[-2:]))
        if kind == "hint":
            return hint_loss(s, t)
        if kind == "attention_transfer":
            return attention_transfer_loss(s, t, p=p)
        if kind == "hidden_state":
            # tokenised text: padding positions carry no meaning, leave them out
            mask = None
            if isinstance(step.inputs, dict) and "attention_mask" in step.inputs and s.dim() == 3:
                mask = step.inputs["attention_mask"].bool()
            return hidden_state_loss(s, t, kind=similarity, mask=mask)
        assert kind == "attention_map"
        return attention_map_kl(s, t)

    return compute


def _relation_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    loss = rkd_distance_loss if spec.kind == "rkd_distance" else rkd_angle_loss
    student_layer, teacher_layer = spec.student, spec.teacher

    own = spec.source == "student"

    def embedding(step: StepOutputs, which: str) -> torch.Tensor:
        layer = student_layer if which == "student" else teacher_layer
        if layer is None:
            out = student_side(step, spec) if which == "student" else teacher_side(step, spec)
        elif which == "student":
            out = step.student_features[layer]
        else:
            out = (step.student_features if own else step.teacher_features)[layer]
            out = out.detach() if own else out
        return out.flatten(1)

    def compute(step: StepOutputs) -> torch.Tensor:
        return loss(embedding(step, "student"), embedding(step, "teacher"))

    where = f"{_layer(student_layer, 'outputs')}->{_layer(teacher_layer, 'outputs')}"
    return [
        Term(
            spec.name or f"{spec.kind}:{where}",
            spec.weight,
            compute,
            needs_teacher=not own,
            student_layers=tuple(
                name for name in (student_layer, teacher_layer if own else None) if name
            ),
            teacher_layers=(teacher_layer,) if teacher_layer and not own else (),
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
    "token_kl": _token_term,  # GKD (Agarwal et al. 2024): forward/reverse KL, generalized JSD
    "adversarial": _adversarial_term,  # Xu et al. 2018: a discriminator the student learns to fool
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


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Move a tensor, or a dict of tensors (tokenised text: input_ids, attention_mask), to `device`."""
    if isinstance(inputs, dict):
        return {key: to_device(value, device) for key, value in inputs.items()}
    return inputs.to(device)


def _shapes(model: nn.Module | None, example: Any, names: list[str]) -> dict[str, tuple[int, ...]]:
    if not names:
        return {}
    assert model is not None and example is not None
    device = next(model.parameters()).device  # the teacher may already sit on the accelerator
    return feature_shapes(model, to_device(example, device), names)


def _example_outputs(model: nn.Module, example: Any) -> Any:
    """The model's outputs on one batch (no_grad, eval mode, training flags restored)."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(to_device(example, next(model.parameters()).device))
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
