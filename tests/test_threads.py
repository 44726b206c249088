"""The `threads` setting: auto from the idle cores, clamping with a warning, the CLI flag, and a
--resume that may change it."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_user_error, stillroom_in_process
from stillroom import threads
from stillroom.config import dump_recipe, load_recipe


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine with a given load, OMP_NUM_THREADS unset."""

    def make(load: float) -> None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "cores", lambda: 4)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))

    return make


@pytest.mark.parametrize(("load", "expected"), [(0.0, 4), (1.4, 3), (3.6, 1), (9.0, 1)])
def test_auto_uses_the_idle_cores(machine, load, expected):
    machine(load)
    assert threads.choose_threads("auto") == (expected, None)


def test_auto_leaves_an_exported_omp_num_threads(machine, monkeypatch):
    machine(0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads("auto") == (None, None)


@pytest.mark.parametrize(
    ("requested", "expected", "says"),
    [(2, 2, None), (0, 1, "below 1"), (-5, 1, "below 1"), (64, 4, "more than this machine's 4")],
)
def test_a_count_is_clamped_with_a_warning(machine, requested, expected, says):
    machine(0.0)
    count, warning = threads.choose_threads(requested)
    assert count == expected
    assert (warning is None) if says is None else (says in warning)


def test_use_threads_sets_torch_and_restores(machine):
    machine(0.0)
    before = torch.get_num_threads()
    warnings: list[str] = []
    try:
        assert threads.use_threads(99, warn=warnings.append) == 4
        assert torch.get_num_threads() == 4 and len(warnings) == 1
    finally:
        torch.set_num_threads(before)


def test_auto_stays_out_of_config_yaml():
    assert "threads" not in dump_recipe(load_recipe("recipes/digits.yaml", []))
    assert "threads: 2\n" in dump_recipe(load_recipe("recipes/digits.yaml", ["threads=2"]))


def test_the_flag_and_a_bad_value():
    result = stillroom_in_process("check", "recipes/digits.yaml", "threads=3")
    assert result.returncode == 0 and "threads: 3" in result.stdout
    result = stillroom_in_process("distill", "recipes/digits.yaml", "--threads", "many")
    assert_user_error(result, "threads")


def test_resume_may_change_threads(tmp_path):
    """A finished tiny run resumed with other threads: accepted, recorded; another change is not."""
    before = torch.get_num_threads()
    out = tmp_path / "run"
    tiny = [
        "teacher.kind=mlp",
        "teacher.hidden=[16]",
        "teacher.train.epochs=1",
        "student.hidden=[8]",
        "baseline=false",
        "distill.epochs=1",
        "--out",
        out,
        "--no-progress",
        "--no-report",
    ]
    try:
        assert stillroom_in_process("distill", "recipes/digits.yaml", *tiny).returncode == 0
        again = stillroom_in_process(
            "distill", "recipes/digits.yaml", *tiny, "--resume", "--threads", "1"
        )
        assert again.returncode == 0, again.stderr
        assert "threads: 1\n" in (out / "config.yaml").read_text()
        other = stillroom_in_process(
            "distill", "recipes/digits.yaml", *tiny, "--resume", "distill.alpha=0.3"
        )
        assert_user_error(other, "the recipe differs")
    finally:
        torch.set_num_threads(before)
