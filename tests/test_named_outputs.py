"""The loop's general shapes: dict inputs (tokenised text), named outputs (heads, exits), terms whose
teacher side is the student itself, the batch transform, and streaming evaluation per task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.objective import StepOutputs, TermSpec, pick, term_targets
from stillroom.train import TrainArgs, distill, evaluate

FAST = {"progress": False, "lr": 1e-2}


class TwoHeads(nn.Module):
    """A shared trunk with a 10-class head "a" and a 1-value regression head "b"."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.a = nn.Linear(16, 10)
        self.b = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h).squeeze(1)}


def _two_task_loader(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    a = (x.flatten(1)[:, :10].argmax(1)).long()
    b = x.flatten(1).mean(1)
    a[::3] = IGNORE_INDEX  # a third of the samples lack a class label
    b[1::4] = float("nan")  # a quarter lack a regression target
    index = torch.arange(n)
    rows = [(x[i], {"a": a[i], "b": b[i]}, index[i]) for i in range(n)]
    return DataLoader(rows, batch_size=32, shuffle=False)


def test_pick_names_the_outputs_it_has() -> None:
    outputs = {"a": torch.zeros(2, 3), "b": torch.zeros(2)}
    assert pick(outputs, "b", "student") is outputs["b"]
    with pytest.raises(StillroomError, match="returns several outputs \\(a, b\\)"):
        pick(outputs, None, "student")
    with pytest.raises(StillroomError, match="has no output 'c'; it returns: a, b"):
        pick(outputs, "c", "teacher")
    with pytest.raises(StillroomError, match="not a dict of named outputs"):
        pick(torch.zeros(2), "a", "student")


def test_term_targets_reads_the_output_labels() -> None:
    step = StepOutputs(None, None, {"a": torch.tensor([1]), "b": torch.tensor([0.5])})
    assert term_targets(step, TermSpec("hard_label", output="b")).item() == 0.5
    with pytest.raises(StillroomError, match="labels for a, b but a term reads output 'c'"):
        term_targets(step, TermSpec("hard_label", output="c"))


def test_named_outputs_train_log_and_select_per_output() -> None:
    loader = _two_task_loader()
    teacher = TwoHeads(seed=1)
    terms = (
        TermSpec("soft_target", 0.5, output="a", name="kd_a"),
        TermSpec("regression", 0.5, output="b", name="kd_b"),
        TermSpec("hard_label", 0.5, output="a", name="ce_a"),
        TermSpec("hard_label", 0.5, output="b", name="mse_b"),
    )
    args = TrainArgs(
        epochs=2,
        alpha=None,
        terms=terms,
        outputs={"a": "classification", "b": "regression"},
        select="b",
        **FAST,
    )
    result = distill(teacher, TwoHeads(), loader, _two_task_loader(seed=1), args=args)
    last = result.history[-1]
    for key in ("train/kd_a", "train/kd_b", "train/ce_a", "train/mse_b"):
        assert math.isfinite(last[key]), key
    assert {"val/a/accuracy", "val/a/loss", "val/b/rmse", "val/b/loss"} <= last.keys()
    assert result.metric == "b/rmse"
    best = min(r["val/b/rmse"] for r in result.history)
    assert result.best_value == pytest.approx(best)


def test_a_missing_output_is_one_line_error() -> None:
    args = TrainArgs(epochs=1, alpha=None, terms=(TermSpec("hard_label", output="c"),), **FAST)
    with pytest.raises(StillroomError, match="output 'c'"):
        distill(None, TwoHeads(), _two_task_loader(), args=args)


def test_self_sourced_terms_need_no_teacher_and_do_not_pull_the_source() -> None:
    """A soft target read from the student's own deeper output: no teacher, no gradient into it."""
    model = TwoHeads()
    model.b = nn.Linear(16, 10)  # two classification "exits" a (shallow) and b (deep)
    x = torch.randn(8, 1, 8, 8)
    spec = TermSpec("soft_target", output="a", teacher_output="b", source="student")
    from stillroom.objective import build_objective

    (term,) = build_objective([spec], "classification", model, None, x)
    assert not term.needs_teacher
    outputs = model(x)
    term.compute(StepOutputs(outputs, None, torch.zeros(8, dtype=torch.long))).backward()
    assert model.b.weight.grad is None  # the deep output is the teacher: detached
    assert model.a.weight.grad is not None and model.a.weight.grad.abs().sum() > 0

    with pytest.raises(StillroomError, match="no teacher"):
        distill(
            None,
            TwoHeads(),
            _two_task_loader(),
            epochs=1,
            alpha=None,
            terms=(TermSpec("soft_target", output="a"),),
            outputs={"a": "classification"},
            **FAST,
        )


def test_batch_transform_sees_every_step_and_its_batch_is_used() -> None:
    x = torch.randn(64, 4)
    y = torch.zeros(64, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=16)
    seen_steps = []

    def transform(inputs, targets, index, student, step):
        seen_steps.append(step)
        assert isinstance(student, nn.Linear)
        return inputs, torch.ones_like(targets), index  # relabel: every sample is class 1

    torch.manual_seed(0)
    student = nn.Linear(4, 2)
    distill(
        None,
        student,
        loader,
        epochs=3,
        alpha=0.0,
        batch_transform=transform,
        progress=False,
        lr=0.5,
    )
    assert seen_steps == list(range(12))
    assert (student(x).argmax(1) == 1).float().mean() > 0.95  # it learned the transformed labels


def test_dict_inputs_and_token_terms_run_through_the_loop() -> None:
    """A toy language model over {"input_ids", "attention_mask"} with (N, L, V) logits."""

    class ToyLM(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Embedding(12, 8)
            self.head = nn.Linear(8, 12)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.head(self.embed(inputs["input_ids"]))

    ids = torch.randint(0, 12, (24, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    attention = torch.ones_like(ids)
    rows = [({"input_ids": ids[i], "attention_mask": attention[i]}, labels[i]) for i in range(24)]
    loader = DataLoader(rows, batch_size=8)
    terms = (
        TermSpec("token_kl", 0.5, beta=0.5, temperature=2.0, chunk_size=4, name="jsd"),
        TermSpec("hard_label", 0.5, name="ce"),
    )
    result = distill(
        ToyLM(1),
        ToyLM(0),
        loader,
        loader,
        epochs=3,
        alpha=None,
        terms=terms,
        task="language_modeling",
        **FAST,
    )
    assert result.metric == "perplexity"
    ppl = [r["val/perplexity"] for r in result.history]
    assert ppl[-1] < ppl[0]
    assert all(r["train/jsd"] >= 0 for r in result.history)


def test_evaluate_language_modeling_and_embedding_against_references() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11)
    labels = torch.randint(0, 11, (5, 7))
    labels[:, :2] = IGNORE_INDEX  # a prompt the metrics skip

    class Fixed(nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.out = nn.Parameter(out)

        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return self.out[index]

    loader = DataLoader(TensorDataset(torch.arange(5), labels), batch_size=2)
    metrics = evaluate(Fixed(logits), loader, "language_modeling")
    keep = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits[keep], labels[keep])
    assert metrics["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    accuracy = (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()
    assert metrics["token_accuracy"] == pytest.approx(accuracy)

    vectors, reference = torch.randn(6, 4), torch.randn(6, 4)
    loader = DataLoader(TensorDataset(torch.arange(6), reference), batch_size=4)
    metrics = evaluate(Fixed(vectors), loader, "embedding")
    expected = F.cosine_similarity(vectors, reference, dim=1).mean().item()
    assert metrics["cosine"] == pytest.approx(expected, rel=1e-5)


def test_gap_closed_is_reported_only_when_the_teacher_leads() -> None:
    from stillroom.runs import gap_closed

    def rows(metric: str, teacher: float, scratch: float, kd: float) -> dict:
        return {
            "teacher": {metric: teacher},
            "student_scratch": {metric: scratch},
            "student_kd": {metric: kd},
        }

    assert gap_closed(rows("accuracy", 0.9, 0.7, 0.8), "accuracy") == pytest.approx(0.5)
    assert gap_closed(rows("rmse", 1.0, 2.0, 1.5), "rmse") == pytest.approx(0.5)
    assert gap_closed(rows("slant/rmse", 1.0, 2.0, 1.0), "slant/rmse") == pytest.approx(1.0)
    assert gap_closed(rows("accuracy", 0.7, 0.8, 0.9), "accuracy") is None  # teacher behind
    assert gap_closed(rows("rmse", 2.0, 1.0, 1.0), "rmse") is None
    assert gap_closed(rows("accuracy", 0.8, 0.8, 0.9), "accuracy") is None
