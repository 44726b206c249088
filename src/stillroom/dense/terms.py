"""The dense term kinds (rows of stillroom.objective.TERMS): channel-wise distillation over
outputs or two tapped layers, and the heatmap and box-size terms of a CenterNet-style head.

Teacher and student maps of different spatial sizes are aligned to the teacher's
(stillroom.losses.dense.align_to); a detection head's last two channels are box sizes, so the
output terms of a detection run read its heatmap channels only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.losses.dense import (
    SIZE_CHANNELS,
    align_to,
    box_distillation_loss,
    channel_wise_loss,
    heatmap_distillation_loss,
)
from stillroom.losses.features import make_projector
from stillroom.terms import BuildContext, StepOutputs, Term, student_side, teacher_side

if TYPE_CHECKING:
    from stillroom.objective import BoxSpec, CwdSpec, HeatmapSpec


def _maps(spec, step: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = student_side(step, spec), teacher_side(step, spec)
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[1] != teacher.shape[1]:
        raise StillroomError(
            f"term '{spec.name or spec.kind}' compares (N, C, H, W) maps with one number of "
            f"channels; the student gives {tuple(student.shape)} and the teacher "
            f"{tuple(teacher.shape)}: give both heads the same classes"
        )
    return align_to(student, teacher), teacher


def _heat_channels(ctx: BuildContext, kind: str) -> slice:
    if ctx.task != "detection":
        raise StillroomError(
            f"term '{kind}' reads a detection head (class heatmaps + box sizes) but the task is "
            f"{ctx.task}; use it with task detection"
        )
    return slice(None, -SIZE_CHANNELS)


def cwd_term(spec: CwdSpec, ctx: BuildContext) -> list[Term]:
    """Channel-wise distillation (Shu et al. 2021) of the outputs (a detection head's heatmaps),
    or of two named layers, with a learned 1x1 conv when their widths differ."""
    temperature = spec.temperature
    if spec.student is None:
        channels = slice(None, -SIZE_CHANNELS) if ctx.task == "detection" else slice(None)

        def on_outputs(step: StepOutputs) -> torch.Tensor:
            student, teacher = _maps(spec, step)
            return channel_wise_loss(student[:, channels], teacher[:, channels], temperature)

        needs = spec.source == "teacher"
        return [Term(spec.name or "cwd", spec.weight, on_outputs, needs_teacher=needs)]
    assert spec.teacher is not None  # the spec's validator asks for both names
    student_layer, teacher_layer = spec.student, spec.teacher
    s_shape = ctx.student_shapes[student_layer]
    t_shape = ctx.shapes_of(spec, "teacher")[teacher_layer]
    if len(s_shape) != 4 or len(t_shape) != 4:
        raise StillroomError(
            f"term 'cwd' {student_layer} -> {teacher_layer}: both layers must give (N, C, H, W) "
            f"maps, got {s_shape} and {t_shape}"
        )
    projector = make_projector(s_shape, t_shape)
    projector = None if isinstance(projector, nn.Identity) else projector
    name = spec.name or f"cwd:{student_layer}->{teacher_layer}"
    own = spec.source == "student"

    def on_layers(step: StepOutputs) -> torch.Tensor:
        s = step.student_features.get(f"projected:{name}", step.student_features[student_layer])
        t = (step.student_features if own else step.teacher_features)[teacher_layer]
        t = t.detach() if own else t
        return channel_wise_loss(align_to(s, t), t, temperature)

    return [
        Term(
            name,
            spec.weight,
            on_layers,
            needs_teacher=not own,
            student_layers=(student_layer, teacher_layer) if own else (student_layer,),
            teacher_layers=() if own else (teacher_layer,),
            projector=projector,
        )
    ]


def heatmap_term(spec: HeatmapSpec, ctx: BuildContext) -> list[Term]:
    heat, temperature = _heat_channels(ctx, spec.kind), spec.temperature

    def compute(step: StepOutputs) -> torch.Tensor:
        student, teacher = _maps(spec, step)
        return heatmap_distillation_loss(student[:, heat], teacher[:, heat], temperature)

    return [Term(spec.name or "heatmap", spec.weight, compute, spec.source == "teacher")]


def box_term(spec: BoxSpec, ctx: BuildContext) -> list[Term]:
    heat = _heat_channels(ctx, spec.kind)

    def compute(step: StepOutputs) -> torch.Tensor:
        student, teacher = _maps(spec, step)
        sizes = slice(-SIZE_CHANNELS, None)
        # sizes are in output cells: a student at another resolution counts other cells
        scale = teacher.shape[-1] / student_side(step, spec).shape[-1]
        return box_distillation_loss(
            student[:, sizes] * scale, teacher[:, sizes], teacher[:, heat].detach()
        )

    return [Term(spec.name or "box", spec.weight, compute, spec.source == "teacher")]
