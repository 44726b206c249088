"""stillroom: knowledge distillation — train a small, fast student to imitate a large teacher."""

from stillroom.errors import NonFiniteLossError, StillroomError
from stillroom.losses import (
    blend,
    distillation_loss,
    regression_distillation_loss,
    soft_target_loss,
)
from stillroom.store import StoreTeacher, cache_teacher
from stillroom.teachers import CachedTeacher, FrozenTeacher, generate_soft_targets
from stillroom.train import DistillResult, TrainArgs, distill, evaluate

__version__ = "0.1.0"

__all__ = [
    "CachedTeacher",
    "DistillResult",
    "FrozenTeacher",
    "NonFiniteLossError",
    "StillroomError",
    "StoreTeacher",
    "TrainArgs",
    "__version__",
    "blend",
    "cache_teacher",
    "distill",
    "distillation_loss",
    "evaluate",
    "generate_soft_targets",
    "regression_distillation_loss",
    "soft_target_loss",
]
