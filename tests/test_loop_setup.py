"""What the loop sets up once instead of on every batch: output shape checks inside the terms, the
critics behind one call, the run state that checkpoints carry."""

from __future__ import annotations

import pytest
import torch

from stillroom.errors import StillroomError
from stillroom.losses import topk_targets_from_logits
from stillroom.objective import StepOutputs, TermSpec, build_objective
from stillroom.train.critics import Critics
from stillroom.train.loop import RunState


def _one_term(spec: TermSpec, task: str = "classification"):
    (term,) = build_objective([spec], task, torch.nn.Identity(), None, None)
    return term


def _step(student: torch.Tensor, teacher) -> StepOutputs:
    return StepOutputs(student, teacher, torch.zeros(len(student), dtype=torch.long))


def test_an_output_term_checks_shapes_on_its_first_batch_only() -> None:
    term = _one_term(TermSpec("soft_target", temperature=2.0))
    with pytest.raises(StillroomError, match=r"\(4, 5\) but teacher outputs \(4, 6\).*classes"):
        term.compute(_step(torch.randn(4, 5), torch.randn(4, 6)))
    term = _one_term(TermSpec("soft_target", temperature=2.0))
    term.compute(_step(torch.randn(4, 5), torch.randn(4, 5)))
    # checked once: a later batch goes straight to the loss, which raises its own ValueError
    with pytest.raises(ValueError, match="differ in shape"):
        term.compute(_step(torch.randn(4, 5), torch.randn(4, 6)))


def test_each_output_kind_checks_what_its_loss_reads() -> None:
    logits = torch.randn(4, 10)
    topk = topk_targets_from_logits(logits, 3)
    with pytest.raises(StillroomError, match=r"top-k targets .* use distill.loss=topk_soft_target"):
        _one_term(TermSpec("dkd", temperature=1.0)).compute(_step(logits, topk))
    with pytest.raises(StillroomError, match="needs a top-k store as the teacher"):
        _one_term(TermSpec("topk_soft_target", temperature=1.0)).compute(_step(logits, logits))
    with pytest.raises(StillroomError, match=r"cover positions \(3,\).*made for other data"):
        _one_term(TermSpec("topk_soft_target", temperature=1.0)).compute(
            _step(logits, topk_targets_from_logits(logits[:3], 3))
        )
    # regression: (N, 1) heads against (N,) values hold the same numbers
    regression = _one_term(TermSpec("regression"), task="regression")
    assert torch.isfinite(regression.compute(_step(torch.randn(4, 1), torch.randn(4))))
    with pytest.raises(StillroomError, match=r"\(4, 2\) but teacher outputs \(4,\)"):
        _one_term(TermSpec("regression"), "regression").compute(
            _step(torch.randn(4, 2), torch.randn(4))
        )


def test_critics_without_adversarial_terms_do_nothing() -> None:
    critics = Critics([_one_term(TermSpec("soft_target", temperature=1.0))])
    assert not critics and critics.optimizer is None and critics.names == []
    assert critics.step(_step(torch.randn(2, 3), torch.randn(2, 3)), accelerator=None) == {}


def test_the_critics_step_updates_only_the_discriminators() -> None:
    class OneProcess:
        num_processes = 1

    torch.manual_seed(0)
    student_logits = torch.randn(8, 4, requires_grad=True)
    example = torch.randn(8, 4)
    (term,) = build_objective(
        [TermSpec("adversarial", name="adv", critic_lr=0.1)],
        "classification",
        torch.nn.Identity(),
        None,
        example,
        temperature=1.0,
    )
    critics = Critics([term])
    assert critics.names == ["adv/critic_loss", "adv/critic_accuracy"]
    before = [p.detach().clone() for p in term.critic.parameters()]
    logged = critics.step(_step(student_logits, torch.randn(8, 4)), OneProcess())
    assert set(logged) == set(critics.names)
    assert student_logits.grad is None  # the student's side is held fixed
    after = list(term.critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None or not p.grad.any() for p in term.critic.parameters())


def test_the_run_state_round_trips_through_a_checkpoint_s_state() -> None:
    run = RunState(epoch=3, step=15, batches=15, best_value=0.5, best_epoch=2, bad_epochs=1)
    run.history = [{"epoch": 1}]
    run.best_weights = {"w": torch.ones(1)}
    saved = run.to_saved()
    assert "best_weights" not in saved
    # a checkpoint's state.json also holds the optimizer's and scheduler's; those are not the run's
    restored = RunState.from_saved({**saved, "optimizer": {}, "scheduler": {}})
    assert restored == RunState(**{**saved})
    # a checkpoint written before a field existed resumes with its default
    assert RunState.from_saved({"epoch": 2, "step": 10}).batches == 0
