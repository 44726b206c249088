"""Prompt/completion pairs from two columns of the user's table (causal_lm: data.completion)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from stillroom.errors import StillroomError
from stillroom.llm.corpus import read_corpus
from stillroom.methods import load_method_recipe


def test_two_columns_read_as_prompt_completion_pairs(tmp_path: Path) -> None:
    table = tmp_path / "qa.csv"
    table.write_text('question,answer\n"2+2?","four"\n"Capital of France?",Paris\n')
    corpus = read_corpus("csv", table, text="question", completion="answer")
    assert corpus.pairs == [("2+2?", "four"), ("Capital of France?", "Paris")]
    assert corpus.documents == []
    with pytest.raises(StillroomError, match="both name column 'question'"):
        read_corpus("csv", table, text="question", completion="question")
    with pytest.raises(StillroomError, match=r"data\.completion names a column of a table"):
        read_corpus("sonnets", completion="answer")


def test_the_recipe_field_reaches_the_corpus(tmp_path: Path) -> None:
    _, recipe = load_method_recipe(
        Path("recipes/own_text_causal.yaml"), ["data.text=question", "data.completion=answer"]
    )
    assert recipe.data.completion == "answer"
