"""Optuna on stillroom recipes: `tune` (T, alpha, lr, any dotted field) and `search` (the
student's shape under a budget). See study.py and search.py."""

from stillroom.tune.search import SearchResult, search
from stillroom.tune.search_space import SearchSection
from stillroom.tune.space import Param, TuneSection
from stillroom.tune.study import TuneResult, tune

__all__ = ["Param", "SearchResult", "SearchSection", "TuneResult", "TuneSection", "search", "tune"]
