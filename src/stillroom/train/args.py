"""The plain arguments of one training run (builders turn recipes into these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stillroom.losses import HARD_LABEL_TERMS
from stillroom.objective import (
    DEFAULT_TEMPERATURE,
    OUTPUT_KINDS,
    TERMS,
    DkdSpec,
    TermSpec,
    field_default,
)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")
KEEPS = ("best", "last")


@dataclass
class TrainArgs:
    """How to train one student (or a teacher, with alpha=0).

    alpha weights the distillation term: `loss = alpha * distillation + (1 - alpha) * hard_label`,
    and `terms` adds further weighted terms (features, attention, relations, DKD) to that sum.
    alpha=None drops that classic pair: the objective is then exactly `terms` (the way to weight
    every term yourself, and what models with named `outputs` always use).
    """

    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    # SGD only: heavy-ball momentum, Nesterov's variant of it
    momentum: float = 0.9
    nesterov: bool = True
    scheduler: str = "cosine"
    warmup_steps: int = 0
    alpha: float | None = 0.9
    temperature: float = DEFAULT_TEMPERATURE
    loss: str = "soft_target"
    dkd_alpha: float = field_default(DkdSpec, "dkd_alpha")
    dkd_beta: float = field_default(DkdSpec, "dkd_beta")
    terms: tuple[TermSpec, ...] = ()
    task: str = "classification"
    # models with named outputs (multi-task heads, self-distillation exits): the task of each
    # output, and the output whose validation metric picks the best checkpoint (default: first)
    outputs: dict[str, str] | None = None
    select: str | None = None
    patience: int | None = None
    # which epoch's weights a run returns: the best on validation, or simply the last
    keep: str = "best"
    # Hinton et al. 2012's constraint: each unit's incoming weight vector (a row of every
    # nn.Linear weight) is scaled back to this L2 norm after each step when it grows past it
    max_norm: float | None = None
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    cpu: bool = False
    seed: int = 0
    progress: bool = True
    description: str = "train"

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (
                self.alpha is None or 0.0 <= self.alpha <= 1.0,
                f"alpha must be in [0, 1] (or None: terms only), got {self.alpha}",
            ),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (
                self.grad_accum_steps >= 1,
                f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}",
            ),
            (
                self.patience is None or self.patience >= 1,
                f"patience must be >= 1, got {self.patience}",
            ),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
            ),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (
                not (self.optimizer == "sgd" and self.nesterov and self.momentum == 0),
                "nesterov needs momentum > 0; set nesterov false or give a momentum",
            ),
            (self.keep in KEEPS, f"keep must be one of {KEEPS}, got {self.keep!r}"),
            (
                not (self.keep == "last" and self.patience is not None),
                "keep: last returns the final epoch, patience would stop before it at a worse "
                "one; drop one of them",
            ),
            (
                self.max_norm is None or self.max_norm > 0,
                f"max_norm must be > 0, got {self.max_norm}",
            ),
            (
                self.scheduler in SCHEDULERS,
                f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}",
            ),
            (
                self.mixed_precision in PRECISIONS,
                f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}",
            ),
            (self.loss in OUTPUT_KINDS, f"loss must be one of {OUTPUT_KINDS}, got {self.loss!r}"),
            *(
                (spec.kind in TERMS, f"term kind must be one of {tuple(TERMS)}, got {spec.kind!r}")
                for spec in self.terms
            ),
            (
                self.task in HARD_LABEL_TERMS,
                f"task must be one of {tuple(HARD_LABEL_TERMS)}, got {self.task!r}",
            ),
            *(
                (
                    kind in HARD_LABEL_TERMS,
                    f"outputs['{key}'] must be one of {tuple(HARD_LABEL_TERMS)}, got {kind!r}",
                )
                for key, kind in (self.outputs or {}).items()
            ),
            (
                self.select is None or self.select in (self.outputs or {}),
                f"select must name one of the outputs {tuple(self.outputs or ())}, got {self.select!r}",
            ),
            (
                self.outputs is None or len(self.outputs) > 0,
                "outputs must name at least one output",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def classic(self) -> bool:
        """Whether the objective starts with `alpha * distillation + (1 - alpha) * hard_label`."""
        return self.alpha is not None and self.outputs is None

    @property
    def selected(self) -> tuple[str | None, str]:
        """(output name or None, its task): whose validation metric picks the best checkpoint."""
        if self.outputs is None:
            return None, self.task
        key = self.select or next(iter(self.outputs))
        return key, self.outputs[key]
