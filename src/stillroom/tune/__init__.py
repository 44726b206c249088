"""Optuna on stillroom recipes: `tune` (T, alpha, lr, any dotted field) and `search` (the
student's shape under a budget). See study.py and search.py."""

from stillroom.tune.space import Param, TuneSection
from stillroom.tune.study import TuneResult, tune

__all__ = ["Param", "TuneResult", "TuneSection", "tune"]
