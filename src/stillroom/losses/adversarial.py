"""Adversarial distillation: a discriminator tells teacher outputs from the student's, and the
student learns to fool it (Xu, Hsu & Huang 2018, "Training Shallow and Thin Networks for
Acceleration via Knowledge Distillation with Conditional Adversarial Networks", arXiv:1709.00513;
Wang et al. 2018, KDGAN).

The two players, with D(x) a logit ("x came from the teacher"):

    discriminator:  min_D  0.5 * [softplus(-D(teacher)) + softplus(D(student))]   (binary CE)
    student:        min_S  softplus(-D(student)) = -log sigmoid(D(student))        (non-saturating)

The non-saturating student loss (Goodfellow et al. 2014) keeps gradients alive while the
discriminator still wins easily, early in training. Spectral normalisation (Miyato et al. 2018)
bounds the discriminator's Lipschitz constant, which is what keeps these alternating updates stable
without tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Discriminator(nn.Module):
    """A small MLP critic: (N, D) features or probabilities -> (N,) logits, spectrally normalised."""

    def __init__(self, in_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Linear(in_features, hidden)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(hidden, hidden)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(hidden, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1).float()).squeeze(1)


def adversarial_student_loss(d_student: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(D(student)), averaged: small when the critic takes the student for the teacher.

    d_student: (N,) discriminator logits on the student's outputs (graph to the student kept).
    """
    return F.softplus(-d_student).mean()


def discriminator_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the critic: teacher outputs labelled 1, student outputs 0.

    d_teacher, d_student: (N,) logits. log 2 ~ 0.693 at chance (both logits 0).
    """
    return 0.5 * (F.softplus(-d_teacher).mean() + F.softplus(d_student).mean())


def discriminator_accuracy(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """Share of samples the critic classifies right (0.5 = chance: the student passes for the teacher)."""
    correct = (d_teacher > 0).float().sum() + (d_student <= 0).float().sum()
    return correct / (d_teacher.numel() + d_student.numel())
