"""The distillation loop, its arguments, checkpoints and metrics."""

from stillroom.train.args import TrainArgs
from stillroom.train.evaluate import evaluate, predict
from stillroom.train.loop import DistillResult, distill

__all__ = ["DistillResult", "TrainArgs", "distill", "evaluate", "predict"]
