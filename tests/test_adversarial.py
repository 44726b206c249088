"""Adversarial distillation: the critic's and the student's losses against their references, the
critic's accuracy over a run (it moves toward chance as the student matches the teacher), resume,
and the recipe through the real CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import stillroom.train.loop as loop
from helpers import ROOT, assert_user_error, stillroom_in_process
from stillroom.data import Splits, make_loader
from stillroom.errors import StillroomError
from stillroom.losses.adversarial import (
    Discriminator,
    adversarial_student_loss,
    discriminator_accuracy,
    discriminator_loss,
)
from stillroom.models import build_model
from stillroom.objective import StepOutputs, TermSpec, build_objective
from stillroom.train import distill

RECIPE = ROOT / "recipes" / "digits_adversarial.yaml"
LOG2 = math.log(2.0)
pytestmark = pytest.mark.usefixtures("one_thread")  # steady timing on a shared machine


# 1. the two players' losses ----------------------------------------------------------------------


def test_discriminator_loss_is_log2_at_chance_and_pushes_the_logits_apart():
    d_teacher = torch.zeros(4, requires_grad=True)
    d_student = torch.zeros(4, requires_grad=True)
    loss = discriminator_loss(d_teacher, d_student)
    assert loss.item() == pytest.approx(LOG2)
    loss.backward()
    # d/dd 0.5 * mean(softplus(-d_t)) = -0.5 * sigmoid(0) / N: raise teacher logits, lower student's
    torch.testing.assert_close(d_teacher.grad, torch.full((4,), -0.25 / 4))
    torch.testing.assert_close(d_student.grad, torch.full((4,), 0.25 / 4))


def test_discriminator_loss_is_binary_cross_entropy_with_teacher_as_one():
    torch.manual_seed(0)
    d_teacher, d_student = torch.randn(16) * 3, torch.randn(16) * 3
    reference = F.binary_cross_entropy_with_logits(
        torch.cat([d_teacher, d_student]), torch.cat([torch.ones(16), torch.zeros(16)])
    )
    torch.testing.assert_close(discriminator_loss(d_teacher, d_student), reference)
    # a critic that separates the two sides has a lower loss than one at chance
    assert discriminator_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)) < LOG2


def test_student_loss_is_minus_log_sigmoid_and_does_not_saturate():
    torch.manual_seed(0)
    d = torch.randn(32) * 4
    torch.testing.assert_close(adversarial_student_loss(d), -F.logsigmoid(d).mean())
    assert adversarial_student_loss(torch.zeros(5)).item() == pytest.approx(LOG2)
    # where the critic confidently rejects the student (D = -10), the non-saturating loss still
    # gives a gradient of ~1 per sample; the minimax form log(1 - sigmoid(D)) gives ~4.5e-5
    rejected = torch.full((1,), -10.0, requires_grad=True)
    adversarial_student_loss(rejected).backward()
    assert rejected.grad.item() == pytest.approx(-1.0, abs=1e-4)
    minimax = torch.full((1,), -10.0, requires_grad=True)
    torch.log1p(-torch.sigmoid(minimax)).sum().backward()
    assert abs(minimax.grad.item()) < 1e-4


def test_accuracy_is_one_half_at_chance_and_one_when_separated():
    zeros = torch.zeros(6)
    assert discriminator_accuracy(zeros, zeros).item() == 0.5
    assert discriminator_accuracy(torch.ones(6), -torch.ones(6)).item() == 1.0
    assert discriminator_accuracy(-torch.ones(6), torch.ones(6)).item() == 0.0
    # 3 of 4 teacher samples and 1 of 4 student samples right
    d_teacher = torch.tensor([1.0, 2.0, 3.0, -1.0])
    d_student = torch.tensor([1.0, 2.0, 3.0, -1.0])
    assert discriminator_accuracy(d_teacher, d_student).item() == 0.5


def test_discriminator_gives_one_logit_per_sample_and_is_spectrally_normalised():
    torch.manual_seed(0)
    critic = Discriminator(in_features=2 * 3 * 3, hidden=16)
    assert critic(torch.randn(7, 2, 3, 3)).shape == (7,)  # features are flattened
    linears = [m for m in critic.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    with torch.no_grad():
        for linear in linears:  # a raw scale the normalisation must remove
            linear.parametrizations.weight.original.mul_(10.0)
        for _ in range(30):  # each training-mode forward runs one power iteration
            critic(torch.randn(8, 18))
    for linear in linears:
        raw = torch.linalg.matrix_norm(linear.parametrizations.weight.original, ord=2)
        used = torch.linalg.matrix_norm(linear.weight.detach(), ord=2)
        assert raw > 5.0
        assert used.item() == pytest.approx(1.0, abs=0.02)
    # so the critic is (about) 1-Lipschitz: LeakyReLU(0.2) is 1-Lipschitz too
    critic.eval()
    x, y = torch.randn(64, 18), torch.randn(64, 18)
    with torch.no_grad():
        ratio = (critic(x) - critic(y)).abs() / (x - y).norm(dim=1)
    assert ratio.max() <= 1.05


# 2. the critic in training: toward chance as the student matches the teacher ---------------------


def _mlp(seed: int, hidden: list[int] | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({"kind": "mlp", "hidden": hidden or [32]}, (1, 8, 8), 10)


def _confident_teacher() -> torch.nn.Module:
    """A fixed random MLP, its head scaled so its softmax is peaked like a trained model's."""
    teacher = _mlp(100)
    with torch.no_grad():
        teacher.net[-1].weight.mul_(8.0)
    return teacher


def test_identical_outputs_leave_the_critic_at_chance():
    # a student that is an exact copy of the teacher: however long the critic trains, each sample
    # gets the same logit on both sides, so one of the two is always classified wrong
    teacher = _confident_teacher()
    student = copy.deepcopy(teacher)
    example = torch.rand(32, 1, 8, 8)
    (term,) = build_objective(
        [TermSpec("adversarial", temperature=1.0, critic_lr=1e-2)],
        "classification",
        student,
        teacher,
        example,
    )
    optimizer = torch.optim.Adam(term.critic.parameters(), lr=1e-2, betas=(0.5, 0.999))
    for i in range(20):
        inputs = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            step = StepOutputs(student(inputs), teacher(inputs), None)
        loss, accuracy = term.critic_compute(step)
        assert accuracy.item() == 0.5
        assert loss.item() >= LOG2 - 1e-6  # 0.5 * (softplus(-d) + softplus(d)) >= log 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_critic_accuracy_moves_toward_chance_as_the_student_matches_the_teacher(digits_full):
    """The student starts far from the teacher (the critic soon tells them apart, accuracy ~0.95)
    and learns it slowly through soft_target + adversarial terms; as the KL to the teacher falls,
    the critic's accuracy falls back toward 0.5. Over seeds 0..11 the first three epochs peak at
    0.95..0.97, the last five average 0.46..0.68 (at most 0.39 of the peak's distance from chance)
    and the KL falls 7-10x; the asserts leave margin around those."""
    train = make_loader(digits_full.train.subset(torch.arange(320)), 32, shuffle=True)
    result = distill(
        _confident_teacher(),
        _mlp(seed=3),
        train,
        alpha=1.0,  # soft_target only among the classic terms: the teacher is random, not the labels
        temperature=1.0,
        terms=(TermSpec("adversarial", temperature=1.0, critic_lr=5e-3, name="adv"),),
        epochs=15,
        lr=1e-3,
        scheduler="constant",
        seed=3,
        progress=False,
    )
    accuracy = [r["train/adv/critic_accuracy"] for r in result.history]
    kl = [r["train/distillation"] for r in result.history]
    assert all(math.isfinite(r["train/adv/critic_loss"]) for r in result.history)
    peak, late = max(accuracy[:3]), sum(accuracy[-5:]) / 5
    assert peak >= 0.85, accuracy  # the far student is easy to tell from the teacher
    assert late <= 0.75, accuracy
    assert abs(late - 0.5) <= 0.5 * abs(peak - 0.5), accuracy  # moved (at least) half way to chance
    assert kl[-1] <= 0.3 * kl[0], kl  # because the student now matches the teacher


# 3. layers, bad input, resume ---------------------------------------------------------------------


def test_a_term_needs_both_layers_or_none_and_layers_of_one_shape(digits: Splits):
    teacher, student = _mlp(1), _mlp(2, hidden=[16])
    train = make_loader(digits.train, 32, shuffle=True)
    with pytest.raises(StillroomError, match=r"compares outputs .* or two layers"):
        distill(teacher, student, train, terms=(TermSpec("adversarial", student="net.1"),))
    with pytest.raises(StillroomError, match=r"'net.1' gives \(16,\) but teacher layer 'net.1'"):
        distill(
            teacher,
            student,
            train,
            terms=(TermSpec("adversarial", student="net.1", teacher="net.1"),),
        )


class _Interrupt:
    """Ctrl-C just after checkpoint `k` is written (wraps loop.save_checkpoint)."""

    def __init__(self, k: int) -> None:
        self.k, self.real = k, loop.save_checkpoint

    def __call__(self, root, epoch, *args, **kwargs):
        folder = self.real(root, epoch, *args, **kwargs)
        if epoch == self.k:
            raise KeyboardInterrupt
        return folder


def test_resume_restores_the_critics_and_matches_an_uninterrupted_run(
    digits: Splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # two critics (outputs, and a tapped hidden layer) in two param groups; dropout in the student
    # so the RNG must replay too
    teacher = _mlp(1)

    def student(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model({"kind": "mlp", "hidden": [32], "dropout": 0.3}, (1, 8, 8), 10)

    initial = student(0)
    kwargs = dict(
        epochs=4,
        lr=1e-2,
        progress=False,
        terms=(
            TermSpec("adversarial", weight=0.5, name="adv_out"),
            TermSpec("adversarial", student="net.1", teacher="net.1", critic_lr=1e-3, name="adv_h"),
        ),
    )

    def loaders():
        return make_loader(digits.train, 32, shuffle=True), make_loader(digits.val, 64, False)

    whole = distill(teacher, copy.deepcopy(initial), *loaders(), run_dir=tmp_path / "a", **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", _Interrupt(2))
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, copy.deepcopy(initial), *loaders(), run_dir=tmp_path / "b", **kwargs)
    monkeypatch.undo()
    # a fresh student and fresh critics: everything they need must come from the checkpoint
    resumed = distill(
        teacher, student(99), *loaders(), run_dir=tmp_path / "b", resume=True, **kwargs
    )

    last = Path("checkpoints") / "epoch-0004"
    for name in ("model", "optimizer"):
        a = load_file(str(tmp_path / "a" / last / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / last / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]), f"{name}: {key}"
    critics_a = load_file(str(tmp_path / "a" / last / "critics.safetensors"))
    critics_b = load_file(str(tmp_path / "b" / last / "critics.safetensors"))
    assert critics_a.keys() == critics_b.keys()
    # both discriminators (spectral-norm power-iteration vectors included) and their Adam moments
    assert any(k.startswith("model.0.") and k.endswith("_u") for k in critics_a)
    assert any(k.startswith("model.1.") for k in critics_a)
    assert any(k.startswith("state.") and k.endswith("exp_avg") for k in critics_a)
    for key, value in critics_a.items():
        assert torch.equal(value, critics_b[key]), key

    def logged(result):
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in result.history]

    assert logged(resumed) == logged(whole)
    for name in ("adv_out", "adv_h"):
        assert 0.0 <= whole.history[-1][f"train/{name}/critic_accuracy"] <= 1.0


def test_the_critic_steps_on_every_batch_under_gradient_accumulation(
    digits: Splits, tmp_path: Path
):
    train = make_loader(digits.train, 32, shuffle=True)  # 160 samples: 5 batches
    distill(
        _mlp(1),
        _mlp(2),
        train,
        run_dir=tmp_path,
        epochs=1,
        grad_accum_steps=2,
        progress=False,
        terms=(TermSpec("adversarial"),),
    )
    critics = load_file(str(tmp_path / "checkpoints" / "epoch-0001" / "critics.safetensors"))
    assert critics["state.0.step"].item() == 5


# 4. the recipe through the real CLI ---------------------------------------------------------------

TINY = [
    "teacher.channels=[4]",
    "teacher.hidden=[16]",
    "teacher.train.epochs=1",
    "student.hidden=[8]",
    "distill.epochs=2",
]


def test_cli_runs_the_adversarial_recipe(tmp_path: Path):
    out = tmp_path / "run"
    result = stillroom_in_process(
        "distill",
        RECIPE,
        *TINY,
        "data.batch_size=128",
        "--out",
        out,
        "--no-progress",
        "--no-report",
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student_scratch", "student_kd"}
    assert 0.0 <= results["models"]["student_kd"]["accuracy"] <= 1.0
    records = [
        json.loads(line) for line in (out / "student_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [1, 2]
    name = "train/adversarial:outputs->outputs"
    for record in records:
        assert 0.0 <= record[f"{name}/critic_accuracy"] <= 1.0
        assert 0.0 < record[f"{name}/critic_loss"] < 10.0
        assert math.isfinite(record[name])
    # the critic trained with the student and was checkpointed beside it; the scratch student has none
    assert (out / "student_kd" / "checkpoints" / "epoch-0002" / "critics.safetensors").is_file()
    scratch = json.loads((out / "student_scratch" / "metrics.jsonl").read_text().splitlines()[0])
    assert not any("critic" in key for key in scratch)


def test_cli_refuses_an_adversarial_term_naming_one_layer(tmp_path: Path):
    result = stillroom_in_process(
        "distill",
        RECIPE,
        "distill.terms=[{kind: adversarial, student: net.1}]",
        "--out",
        tmp_path / "run",
    )
    assert_user_error(result, "compares outputs (no names) or two layers (both names)")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def shape_mismatch(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("adversarial") / "run"
    # student net.1 is (N, 8), the teacher's head.1 (N, 16)
    term = "distill.terms=[{kind: adversarial, student: net.1, teacher: head.1}]"
    return out, stillroom_in_process("distill", RECIPE, *TINY, term, "baseline=false", "--out", out)


def test_cli_refuses_adversarial_layers_of_different_shapes(shape_mismatch):
    out, result = shape_mismatch
    assert_user_error(
        result, "student layer 'net.1' gives (8,) but teacher layer 'head.1' gives (16,)"
    )
    assert not (out / "student_kd" / "metrics.jsonl").exists()  # no student trained with it


def test_adversarial_shape_error_comes_before_any_training(shape_mismatch):
    out, result = shape_mismatch
    assert result.returncode == 2
    assert not (out / "teacher").exists()
