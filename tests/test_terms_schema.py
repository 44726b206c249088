"""Term sections: one spec class per kind, discriminated on `kind`, the same type in recipes and the
Python API; a parameter the kind does not have is refused in one line naming where and why."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch

from stillroom.config import DistillSection, load_recipe, read_recipe_tree, validate_recipe
from stillroom.errors import StillroomError
from stillroom.losses import soft_target_loss
from stillroom.objective import (
    SPECS,
    TERMS,
    DkdSpec,
    HintSpec,
    SoftTargetSpec,
    StepOutputs,
    TermSpec,
    build_objective,
    classic_terms,
    field_default,
    with_temperature,
)

_NEEDS_LAYERS = ("hint", "attention_transfer", "hidden_state", "attention_map")


def test_every_kind_of_terms_has_one_spec_class_whose_literal_is_its_kind() -> None:
    assert list(SPECS) == list(TERMS)
    for kind, spec_class in SPECS.items():
        assert get_args(spec_class.__pydantic_fields__["kind"].annotation) == (kind,)


@pytest.mark.parametrize("kind", list(SPECS))
def test_termspec_of_a_kind_is_that_kind_s_class(kind: str) -> None:
    layers = {"student": "a", "teacher": "b"} if kind in _NEEDS_LAYERS else {}
    spec = TermSpec(kind, 0.5, **layers)
    assert type(spec) is SPECS[kind] and isinstance(spec, TermSpec)
    assert spec.weight == 0.5


def test_a_recipe_section_is_the_spec_the_builders_use_with_the_same_defaults() -> None:
    section = DistillSection.model_validate({"terms": [{"kind": "dkd"}]})
    (spec,) = section.terms
    assert spec == TermSpec("dkd") == DkdSpec()
    assert (spec.dkd_alpha, spec.dkd_beta, spec.temperature) == (1.0, 8.0, None)
    # the classic loss's knobs take their defaults from the spec class, written once
    assert section.dkd_beta == field_default(DkdSpec, "dkd_beta") == DkdSpec().dkd_beta


@pytest.mark.parametrize(
    ("term", "message"),
    [
        (
            "{kind: hint, student: a, teacher: b, dkd_beta: 3}",
            r"^r.yaml: distill\.terms\.0: hint has no field 'dkd_beta' \(a field of dkd\)\. "
            r"Allowed here: kind, weight, student, teacher",
        ),
        (
            "{kind: hidden_state, student: a, teacher: b, similarty: cosine}",
            r"^r.yaml: distill\.terms\.0: hidden_state has no field 'similarty'; did you mean "
            r"'similarity'\?",
        ),
        ("{kind: fitnet}", r"distill\.terms\.0\.kind: unknown term kind 'fitnet'.*Allowed: soft"),
        ("{kind: hnt}", r"unknown term kind 'hnt'; did you mean 'hint'\?"),
        ("{weight: 2}", r"distill\.terms\.0\.kind: a term needs a kind\. Allowed: soft_target"),
        ("{kind: token_kl, mask: foo}", r"distill\.terms\.0\.mask: Input should be 'labels'"),
        ("{kind: hint, student: a}", r"distill\.terms\.0: .*needs both 'student' and 'teacher'"),
    ],
)
def test_a_bad_term_section_fails_in_one_line(tmp_path: Path, term: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"distill:\n  terms: [{term}]\n")
    tree, _ = read_recipe_tree(path)
    with pytest.raises(StillroomError, match=message) as err:
        validate_recipe(tree, "r.yaml", type(load_recipe(None)))
    assert "\n" not in str(err.value)


def test_the_python_api_refuses_what_the_kind_does_not_have_in_one_line() -> None:
    with pytest.raises(StillroomError, match=r"^term 'soft_target': soft_target has no field 'p' "):
        TermSpec("soft_target", p=2.0)
    with pytest.raises(StillroomError, match=r"^term 'dkd': dkd_beta: Input should be greater"):
        TermSpec("dkd", dkd_beta=-1.0)
    with pytest.raises(StillroomError, match=r"unknown term kind 'fitnet'; available: soft_target"):
        TermSpec("fitnet")


def test_classic_terms_give_each_kind_only_the_knobs_it_has() -> None:
    distillation, _ = classic_terms(0.9, 2.0, "regression", 1.0, 8.0)
    assert not hasattr(distillation, "temperature")
    distillation, _ = classic_terms(0.9, 2.0, "dkd", 0.5, 4.0)
    assert (distillation.temperature, distillation.dkd_alpha, distillation.dkd_beta) == (2, 0.5, 4)


def test_an_unset_temperature_is_the_run_s() -> None:
    assert with_temperature(SoftTargetSpec(), 3.0).temperature == 3.0
    assert with_temperature(SoftTargetSpec(temperature=1.0), 3.0).temperature == 1.0
    assert with_temperature(HintSpec(student="a", teacher="b"), 3.0) == HintSpec(
        student="a", teacher="b"
    )
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    (term,) = build_objective(
        [SoftTargetSpec()], "classification", torch.nn.Identity(), None, None, temperature=2.0
    )
    got = term.compute(StepOutputs(student, teacher, torch.zeros(4, dtype=torch.long)))
    torch.testing.assert_close(got, soft_target_loss(student, teacher, 2.0))
