"""The term kinds of the objective: what each one computes, built from a `TermSpec`.

`stillroom.objective.TERMS` maps every kind a recipe may name to one builder here:
`builder(spec, ctx) -> [Term, ...]` (a `layers.*` pattern gives one term per layer pair), `spec`
being the kind's spec class (stillroom.objective). A built term is `compute(step) -> scalar`,
weighted by `weight`; the data types a term reads (StepOutputs, Term, BuildContext) are defined here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError
from stillroom.losses import (
    HARD_LABEL_TERMS,
    IGNORE_INDEX,
    TopKTargets,
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

if TYPE_CHECKING:  # the spec classes live beside TERMS, which imports the builders below
    from stillroom.objective import (
        AdversarialSpec,
        DkdSpec,
        SoftTargetSpec,
        TermSpec,
        TokenKlSpec,
        TopKSoftTargetSpec,
    )


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
    # a second player trained in alternation (the adversarial discriminator), by
    # stillroom.train.critics.Critics: critic_compute(step with the student detached) ->
    # (critic loss, critic accuracy), at critic_lr (set with the critic, from the spec)
    critic: nn.Module | None = None
    critic_compute: Callable[[StepOutputs], tuple[torch.Tensor, torch.Tensor]] | None = None
    critic_lr: float | None = None


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


def _output_term(
    spec: TermSpec,
    compute: Callable[[torch.Tensor, Any, StepOutputs], torch.Tensor],
    check: Callable[[TermSpec, torch.Tensor, Any], None],
) -> list[Term]:
    """A term over one pair of outputs: compute(student output, teacher output, step), the pair's
    shapes checked once, on the first batch (the same models and data give the same shapes)."""
    checked = False

    def value(step: StepOutputs) -> torch.Tensor:
        nonlocal checked
        student, teacher = student_side(step, spec), teacher_side(step, spec)
        if not checked:
            check(spec, student, teacher)
            checked = True
        return compute(student, teacher, step)

    return [
        Term(spec.name or spec.kind, spec.weight, value, needs_teacher=spec.source == "teacher")
    ]


def _same_shape(spec: TermSpec, student: torch.Tensor, teacher: Any) -> None:
    """Dense teacher outputs shaped like the student's (regression: the same number of values)."""
    if isinstance(teacher, TopKTargets):
        raise StillroomError(
            f"the teacher gives top-k targets (a top-k store) but term '{spec.name or spec.kind}' "
            f"is {spec.kind}; use distill.loss=topk_soft_target"
        )
    if student.shape != teacher.shape and not (
        spec.kind == "regression" and student.numel() == teacher.numel()
    ):
        raise StillroomError(
            f"student outputs {tuple(student.shape)} but teacher outputs {tuple(teacher.shape)}: "
            "give the student the teacher's number of outputs (classes) and output shape"
        )


def _topk_positions(spec: TermSpec, student: torch.Tensor, teacher: Any) -> None:
    """Top-k targets from a store, one per position of the student's (N, C, ...) logits."""
    if not isinstance(teacher, TopKTargets):
        raise StillroomError(
            "distill.loss=topk_soft_target needs a top-k store as the teacher "
            "(stillroom cache --top-k K)"
        )
    positions = [size for dim, size in enumerate(student.shape) if dim != 1]
    if list(teacher.tail_mass.shape) != positions:
        raise StillroomError(
            f"student outputs {tuple(student.shape)} but the top-k targets cover positions "
            f"{tuple(teacher.tail_mass.shape)}: the store was made for other data"
        )


def soft_target_term(spec: SoftTargetSpec, ctx: BuildContext) -> list[Term]:
    temperature = spec.temperature
    return _output_term(spec, lambda s, t, step: soft_target_loss(s, t, temperature), _same_shape)


def topk_soft_target_term(spec: TopKSoftTargetSpec, ctx: BuildContext) -> list[Term]:
    temperature = spec.temperature
    return _output_term(
        spec,
        lambda s, t, step: topk_soft_target_loss(s, t, temperature, class_dim=1),
        _topk_positions,
    )


def regression_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    task = spec.task or ctx.output_tasks.get(spec.output or "", ctx.task)

    def compute(student: torch.Tensor, teacher: torch.Tensor, step: StepOutputs) -> torch.Tensor:
        if task == "regression":  # (N, 1) heads against (N,) targets from a cache
            student, teacher = match_targets(student, teacher), match_targets(teacher, student)
        return regression_distillation_loss(student, teacher)

    return _output_term(spec, compute, _same_shape)


def dkd_term(spec: DkdSpec, ctx: BuildContext) -> list[Term]:
    alpha, beta, temperature = spec.dkd_alpha, spec.dkd_beta, spec.temperature
    return _output_term(
        spec,
        lambda s, t, step: decoupled_kd_loss(
            s, t, term_targets(step, spec), alpha, beta, temperature
        ),
        _same_shape,
    )


def hard_label_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
    task = spec.task or ctx.output_tasks.get(spec.output or "", ctx.task)
    loss = HARD_LABEL_TERMS[task]

    def compute(step: StepOutputs) -> torch.Tensor:
        targets = term_targets(step, spec)
        return loss(match_targets(student_side(step, spec), targets), targets)

    return [Term(spec.name or "hard_label", spec.weight, compute, False)]


def token_term(spec: TokenKlSpec, ctx: BuildContext) -> list[Term]:
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


def adversarial_term(spec: AdversarialSpec, ctx: BuildContext) -> list[Term]:
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
    student_layers = numbered_children(spec.student, ctx.student_shapes)
    teacher_layers = numbered_children(spec.teacher, ctx.shapes_of(spec, "teacher"))
    mapping = spec.layer_map or tuple(uniform_layer_map(len(student_layers), len(teacher_layers)))
    for s, t in mapping:
        if not (0 <= s < len(student_layers) and 0 <= t < len(teacher_layers)):
            raise StillroomError(
                f"term '{spec.kind}': layer_map pair ({s}, {t}) is out of range; the student has "
                f"{len(student_layers)} and the teacher {len(teacher_layers)} layers under those names"
            )
    return [(student_layers[s], teacher_layers[t]) for s, t in mapping]


def numbered_children(pattern: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    prefix = re.escape(pattern[:-2])
    found = sorted(
        (int(m.group(1)), name) for name in shapes if (m := re.fullmatch(prefix + r"\.(\d+)", name))
    )
    return [name for _, name in found]


def _term_name(spec: TermSpec, student_layer: str, teacher_layer: str) -> str:
    if spec.name and not (spec.student or "").endswith(".*"):
        return spec.name
    return f"{spec.name or spec.kind}:{student_layer}->{teacher_layer}"


def feature_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
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


def _feature_loss(spec: TermSpec) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """loss(student feature, teacher feature, step inputs) for a feature kind."""
    if spec.kind == "hint":
        return lambda s, t, inputs: hint_loss(s, t)
    if spec.kind == "attention_transfer":
        p = spec.p
        return lambda s, t, inputs: attention_transfer_loss(s, t, p=p)
    if spec.kind == "hidden_state":
        similarity = spec.similarity

        def hidden_state(s: torch.Tensor, t: torch.Tensor, inputs: Any) -> torch.Tensor:
            # tokenised text: padding positions carry no meaning, leave them out
            mask = None
            if isinstance(inputs, dict) and "attention_mask" in inputs and s.dim() == 3:
                mask = inputs["attention_mask"].bool()
            return hidden_state_loss(s, t, kind=similarity, mask=mask)

        return hidden_state
    assert spec.kind == "attention_map", spec.kind
    return lambda s, t, inputs: attention_map_kl(s, t)


def _feature_compute(
    spec: TermSpec, student_layer: str, teacher_layer: str, teacher_shape: tuple[int, ...]
) -> Callable[[StepOutputs], torch.Tensor]:
    loss, own = _feature_loss(spec), spec.source == "student"
    spatial = spec.kind in ("hint", "attention_transfer")
    projected = f"projected:{_term_name(spec, student_layer, teacher_layer)}"

    def compute(step: StepOutputs) -> torch.Tensor:
        # a hint term with a projector reads the projected feature ObjectiveStudent adds
        s = step.student_features.get(projected, step.student_features[student_layer])
        t = (step.student_features if own else step.teacher_features)[teacher_layer]
        if own:  # the deeper layer teaches; it is not pulled toward the shallow one
            t = t.detach()
        if spatial and s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            s = align_spatial(s, tuple(t.shape[-2:]))
        return loss(s, t, step.inputs)

    return compute


def relation_term(spec: TermSpec, ctx: BuildContext) -> list[Term]:
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


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Move a tensor, or a dict of tensors (tokenised text: input_ids, attention_mask), to `device`."""
    if isinstance(inputs, dict):
        return {key: to_device(value, device) for key, value in inputs.items()}
    return inputs.to(device)
