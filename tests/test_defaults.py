"""Every default is written once: the plain argument objects take theirs from the term specs."""

from __future__ import annotations

from stillroom.config import DistillSection
from stillroom.methods.multitask_distill import TaskSpec
from stillroom.objective import DEFAULT_TEMPERATURE, DkdSpec, field_default
from stillroom.train import TrainArgs


def test_temperature_and_dkd_weights_have_one_default() -> None:
    section = DistillSection()
    for holder in (TrainArgs(), TaskSpec("digit", "classification"), section):
        assert holder.temperature == DEFAULT_TEMPERATURE
        assert holder.dkd_alpha == field_default(DkdSpec, "dkd_alpha")
        assert holder.dkd_beta == field_default(DkdSpec, "dkd_beta")
