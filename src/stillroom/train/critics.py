"""Second players: modules a term trains in alternation with the student (the adversarial
discriminator). The loop makes one call per batch, after the student's step:

    values.update(critics.step(step, accelerator))

Each critic term brings its module (`Term.critic`), its learning rate and `critic_compute(step) ->
(critic loss, critic accuracy)`; this owns their optimizer and the update.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from stillroom.terms import StepOutputs, Term


class Critics:
    """The critics of the weighted terms, their optimizer, and their turn on a batch."""

    def __init__(self, terms: list[Term]) -> None:
        self.terms = [t for t in terms if t.critic is not None and t.weight > 0]
        self.modules = nn.ModuleList([t.critic for t in self.terms])
        # Adam with beta1 = 0.5, the usual choice for GAN discriminators (Radford et al. 2016)
        groups = [{"params": list(t.critic.parameters()), "lr": t.critic_lr} for t in self.terms]
        self.optimizer = torch.optim.Adam(groups, betas=(0.5, 0.999)) if groups else None

    def __bool__(self) -> bool:
        return bool(self.terms)

    @property
    def names(self) -> list[str]:
        """What `step` logs: `<term>/critic_loss` and `<term>/critic_accuracy` per critic."""
        return [
            f"{t.name}/{what}" for t in self.terms for what in ("critic_loss", "critic_accuracy")
        ]

    def to(self, device: torch.device) -> Critics:
        # moved, not prepared: an AcceleratedOptimizer would hold their updates until the student's
        # gradient-accumulation sync, and the terms call the bare critic, never a DDP wrapper
        self.modules.to(device)
        return self

    def step(self, step: StepOutputs, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        """One update of every critic on this batch, the student's outputs detached: the student has
        just moved, now the discriminator answers. Returns their losses and accuracies."""
        if self.optimizer is None:
            return {}
        detached = replace(
            step,
            student=_detach(step.student),
            student_features={k: v.detach() for k, v in step.student_features.items()},
        )
        # the student's adversarial term also left gradients on the critics: start from zero
        self.optimizer.zero_grad()
        logged: dict[str, torch.Tensor] = {}
        total = 0.0
        for term in self.terms:
            assert term.critic_compute is not None
            loss, accuracy = term.critic_compute(detached)
            total = total + loss
            logged[f"{term.name}/critic_loss"] = loss.detach()
            logged[f"{term.name}/critic_accuracy"] = accuracy.detach()
        total.backward()
        if (
            accelerator.num_processes > 1
        ):  # the critics are not DDP-wrapped: average their gradients
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad()
        return logged


def _detach(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return {key: value.detach() for key, value in outputs.items()}
    return outputs.detach()
