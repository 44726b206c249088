"""Ensemble distillation: the merge maths against hand references, learned weights, shape
mismatches, the merged store, and the `ensemble` method end to end through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_user_error, stillroom_in_process, tree_digest
from stillroom import distill
from stillroom.data import make_loader
from stillroom.errors import StillroomError
from stillroom.losses import soft_target_loss
from stillroom.methods import load_method_recipe
from stillroom.methods.ensemble import run_ensemble
from stillroom.models import save_model
from stillroom.pipeline import prepare_data
from stillroom.store import StoreTeacher, cache_teacher
from stillroom.teachers import (
    CachedTeacher,
    EnsembleModule,
    EnsembleTeacher,
    combine_outputs,
    ensemble_weights,
    fit_ensemble_weights,
    generate_soft_targets,
)

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_ensemble.yaml"


def _logits(seed: int, shape: tuple[int, ...] = (6, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_combine_matches_hand_references() -> None:
    a, b = _logits(0), _logits(1)
    w = torch.tensor([0.25, 0.75])
    mixture = 0.25 * torch.softmax(a, 1) + 0.75 * torch.softmax(b, 1)
    stacked = torch.stack([a, b])
    torch.testing.assert_close(combine_outputs(stacked, w, "mean_prob"), mixture.log())
    torch.testing.assert_close(combine_outputs(stacked, w, "mean_logit"), 0.25 * a + 0.75 * b)
    # no weights: uniform
    uniform = (0.5 * torch.softmax(a, 1) + 0.5 * torch.softmax(b, 1)).log()
    torch.testing.assert_close(combine_outputs(stacked, None, "mean_prob"), uniform)
    # the teacher over cached members: the same, with weights normalised to sum 1
    teacher = EnsembleTeacher([CachedTeacher(a), CachedTeacher(b)], "mean_prob", weights=[1, 3])
    torch.testing.assert_close(teacher(a, torch.arange(6)), mixture.log())
    torch.testing.assert_close(teacher.weights, w)


def test_mean_prob_as_logits_and_temperature() -> None:
    """softmax(log p_bar) = p_bar; at temperature T the loss sees p_bar**(1/T) / Z."""
    stacked = torch.stack([_logits(2), _logits(3)])
    log_p = combine_outputs(stacked, None, "mean_prob")
    p_bar = torch.softmax(stacked, 2).mean(0)
    torch.testing.assert_close(torch.softmax(log_p, 1), p_bar)
    T = 4.0
    sharpened = p_bar ** (1 / T) / (p_bar ** (1 / T)).sum(1, keepdim=True)
    student = _logits(4)
    reference = (sharpened * (sharpened.log() - torch.log_softmax(student / T, 1))).sum(1).mean()
    torch.testing.assert_close(soft_target_loss(student, log_p, T), reference * T**2)


def test_confident_members_stay_finite() -> None:
    # softmax underflows to exactly 0 here; log(0) would make the distillation loss nan
    confident = torch.tensor([[1000.0, 0.0, -1000.0]])
    merged = combine_outputs(torch.stack([confident, confident.flip(1)]), None, "mean_prob")
    assert torch.isfinite(merged).all()
    assert torch.isfinite(soft_target_loss(torch.zeros(1, 3), merged, 1.0))


def test_single_member_ensemble_equals_the_member(make_mlp) -> None:
    member = make_mlp(outputs=10)
    x = torch.randn(7, 1, 8, 8)
    expected = member(x).detach()
    torch.testing.assert_close(EnsembleTeacher([member], "mean_logit")(x), expected)
    as_probs = EnsembleTeacher([member], "mean_prob")(x)
    torch.testing.assert_close(as_probs, torch.log_softmax(expected, 1))
    torch.testing.assert_close(EnsembleModule([member], "mean_logit")(x), expected)


def test_distill_from_an_ensemble_of_live_and_cached_members(make_mlp, digits) -> None:
    """The Python API: an EnsembleTeacher is the `teacher` of `distill` like any other."""
    live, other = make_mlp(outputs=10, seed=1), make_mlp(hidden=[8], outputs=10, seed=2)
    cached = generate_soft_targets(other, make_loader(digits.train, 64, shuffle=False))
    teacher = EnsembleTeacher([live, cached], "mean_prob", weights=[0.6, 0.4])
    train = make_loader(digits.train, 32, shuffle=True)
    result = distill(teacher, make_mlp(seed=3), train, epochs=1, progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["train/distillation"]))


def test_weights_are_normalised_and_checked() -> None:
    torch.testing.assert_close(ensemble_weights([2, 6], 2), torch.tensor([0.25, 0.75]))
    assert ensemble_weights(None, 3).sum().item() == pytest.approx(1.0)
    for bad, fragment in (([1.0], "1 ensemble weights for 2"), ([1, -1], ">= 0"), ([0, 0], ">= 0")):
        with pytest.raises(StillroomError, match=fragment):
            ensemble_weights(bad, 2)
    with pytest.raises(StillroomError, match="combine must be one of"):
        EnsembleTeacher([CachedTeacher(_logits(0))], "median")


def test_learned_weights_prefer_the_better_member() -> None:
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))
    good = 4 * torch.nn.functional.one_hot(labels, 5).float() + _logits(5, (200, 5)) * 0.3
    noise = _logits(6, (200, 5))
    outputs = torch.stack([noise, good])
    for combine in ("mean_prob", "mean_logit"):
        weights = fit_ensemble_weights(outputs, labels, combine)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (weights >= 0).all() and weights[1] > 0.8, (combine, weights)
        torch.testing.assert_close(weights, fit_ensemble_weights(outputs, labels, combine))
    # regression: the weighted mean prediction, fitted on squared error
    targets = torch.linspace(-1, 1, 50)
    preds = torch.stack([targets + 0.05 * _logits(7, (50,)), _logits(8, (50,))]).unsqueeze(-1)
    weights = fit_ensemble_weights(preds, targets.unsqueeze(1), "mean_logit")
    assert weights[0] > 0.9
    with pytest.raises(StillroomError, match="mean_logit"):
        fit_ensemble_weights(preds, targets.unsqueeze(1), "mean_prob")


def test_members_that_disagree_in_class_count_are_refused(make_mlp) -> None:
    ten, five = make_mlp(outputs=10), make_mlp(outputs=5)
    x = torch.randn(4, 1, 8, 8)
    # live members: at construction with an example batch, else at the first call
    with pytest.raises(
        StillroomError,
        match=r"member 1 outputs \(4, 5\) but member 0 outputs \(4, 10\) \(5 classes vs 10\)",
    ):
        EnsembleTeacher([ten, five], example=(x, None))
    lazy = EnsembleTeacher([ten, ten, five])
    with pytest.raises(StillroomError, match="member 2 outputs"):
        lazy(x)
    with pytest.raises(StillroomError, match="member 1 outputs"):
        EnsembleModule([ten, five])(x)
    # cached members: their shapes are known, so at construction
    with pytest.raises(StillroomError, match=r"member 1 outputs per sample \(5,\)"):
        EnsembleTeacher([CachedTeacher(torch.zeros(3, 10)), CachedTeacher(torch.zeros(3, 5))])


def test_merged_store_and_member_stores(tmp_path: Path, make_mlp, digits) -> None:
    data = digits.train.subset(torch.arange(64))
    members = [make_mlp(outputs=10, seed=1), make_mlp(hidden=[8], outputs=10, seed=2)]
    index = torch.arange(64)
    live = EnsembleTeacher(members, "mean_prob", weights=[0.3, 0.7])(data.inputs, index)

    # one merged store: the ensemble as one module, cached once
    ensemble = EnsembleModule(members, "mean_prob", weights=[0.3, 0.7])
    cache_teacher(ensemble, data, tmp_path / "merged", precision="fp32", progress=False)
    merged = StoreTeacher(tmp_path / "merged", teacher=ensemble, data=data)
    torch.testing.assert_close(merged(data.inputs, index), live, atol=1e-5, rtol=1e-5)
    # the rule and the weights are part of the fingerprint: another ensemble is refused
    with pytest.raises(StillroomError, match="different teacher"):
        StoreTeacher(tmp_path / "merged", teacher=EnsembleModule(members, "mean_logit", [0.3, 0.7]))

    # one store per member, merged at every call
    stores = []
    for i, member in enumerate(members):
        cache_teacher(member, data, tmp_path / f"m{i}", precision="fp32", progress=False)
        stores.append(StoreTeacher(tmp_path / f"m{i}", teacher=member, data=data))
    from_stores = EnsembleTeacher(stores, "mean_prob", weights=[0.3, 0.7])
    torch.testing.assert_close(from_stores(data.inputs, index), live, atol=1e-5, rtol=1e-5)


SMALL = [
    "teachers=[{kind: mlp, hidden: [32], train: {epochs: 2}},"
    " {kind: cnn, channels: [4], hidden: [16], train: {epochs: 2, lr: 0.01}}]",
    "ensemble.learn_weights=true",
    "distill.epochs=2",
]


def test_cli_end_to_end_and_resume(tmp_path: Path, monkeypatch, one_thread) -> None:
    # one thread: on a shared machine a second one waits for a core at every op
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    result = stillroom_in_process("distill", RECIPE, *SMALL, "--out", run_dir, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "ensemble" in result.stdout and "teacher_1" in result.stdout

    results = json.loads((run_dir / "results.json").read_text())
    rows = results["models"]
    assert list(rows) == ["ensemble", "teacher_0", "teacher_1", "student_scratch", "student_kd"]
    for row in rows.values():
        assert 0.1 < row["accuracy"] <= 1.0 and row["parameters"] > 0 and row["latency_ms"] > 0
    assert (
        rows["ensemble"]["parameters"]
        == rows["teacher_0"]["parameters"] + rows["teacher_1"]["parameters"]
    )
    assert (
        rows["ensemble"]["size_bytes"]
        == rows["teacher_0"]["size_bytes"] + rows["teacher_1"]["size_bytes"]
    )
    weights = [rows["teacher_0"]["weight"], rows["teacher_1"]["weight"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5) and weights == pytest.approx(
        results["weights"]
    )
    for role in ("teacher_0", "teacher_1", "student_scratch", "student_kd"):
        assert 0.0 <= rows[role]["ensemble_agreement"] <= 1.0
    ens, scratch, kd = (rows[r]["accuracy"] for r in ("ensemble", "student_scratch", "student_kd"))
    if ens > scratch:
        assert results["gap_closed"] == pytest.approx((kd - scratch) / (ens - scratch))
    else:  # the ensemble does not lead: no meaningful share of its lead to report
        assert results["gap_closed"] is None
    summary = json.loads((run_dir / "ensemble.json").read_text())
    assert summary["weights_from"] == "validation fit"
    # fitted on the validation NLL, starting from uniform weights: never worse there
    assert summary["validation"]["used"]["nll"] <= summary["validation"]["uniform"]["nll"] + 1e-6
    soft = load_file(str(run_dir / "soft_targets.safetensors"))["outputs"]
    assert soft.shape == (results["train_samples"], 10)
    # mean_prob targets are log-probabilities: each row's probabilities sum to 1
    torch.testing.assert_close(soft.exp().sum(1), torch.ones(len(soft)))
    assert "| ensemble_agreement | member_weight |" in (run_dir / "results.md").read_text()

    # --resume: finished members are loaded, not retrained
    members = {i: tree_digest(run_dir / f"teacher_{i}") for i in (0, 1)}
    _, recipe = load_method_recipe(RECIPE, SMALL)
    resumed = run_ensemble(recipe, run_dir, resume=True, progress=False)
    assert {i: tree_digest(run_dir / f"teacher_{i}") for i in (0, 1)} == members
    assert resumed.rows["student_kd"]["accuracy"] == pytest.approx(kd)


def test_cli_member_with_another_class_count(tmp_path: Path, make_mlp, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    checkpoint = tmp_path / "five_classes"
    save_model(
        make_mlp(outputs=5),
        {"kind": "mlp", "hidden": [16]},
        checkpoint,
        input_shape=[1, 8, 8],
        num_outputs=5,
    )
    run_dir = tmp_path / "run"
    teachers = f"teachers=[{{kind: mlp, train: {{epochs: 1}}}}, {{checkpoint: {checkpoint}}}]"
    result = stillroom_in_process("distill", RECIPE, teachers, "--out", run_dir)
    assert_user_error(result, "teachers[1]: checkpoint")
    assert "with 5 outputs" in result.stderr
    assert not run_dir.exists()


def test_recipe_mistakes_fail_at_load() -> None:
    with pytest.raises(StillroomError, match="1 weights for 3 teachers"):
        load_method_recipe(RECIPE, ["ensemble.weights=[1]"])
    with pytest.raises(StillroomError, match="lists its members under 'teachers'"):
        load_method_recipe(RECIPE, ["teacher.kind=cnn"])


def test_run_from_member_stores_and_from_a_merged_store(tmp_path: Path, make_mlp, one_thread):
    """Members loaded from checkpoints, their training outputs read from one store each, or the
    whole ensemble's from one merged store (untrained members: this tests the plumbing)."""
    members = [make_mlp(outputs=10, seed=1), make_mlp(hidden=[8], outputs=10, seed=2)]
    for i, member in enumerate(members):
        spec = {"kind": "mlp", "hidden": [16] if i == 0 else [8]}
        save_model(member, spec, tmp_path / f"c{i}", input_shape=[1, 8, 8], num_outputs=10)
    small = ["baseline=false", "distill.epochs=1", "ensemble.weights=[1, 3]"]
    with_stores = [
        f"teachers=[{{checkpoint: {tmp_path / 'c0'}, store: {tmp_path / 's0'}}},"
        f" {{checkpoint: {tmp_path / 'c1'}, store: {tmp_path / 's1'}}}]",
        *small,
    ]
    _, recipe = load_method_recipe(RECIPE, with_stores)
    student_train = prepare_data(recipe)[1]
    for i, member in enumerate(members):
        cache_teacher(member, student_train, tmp_path / f"s{i}", precision="fp32", progress=False)
    result = run_ensemble(recipe, tmp_path / "run", progress=False)
    assert set(result.rows) == {"ensemble", "teacher_0", "teacher_1", "student_kd"}
    soft = load_file(str(tmp_path / "run" / "soft_targets.safetensors"))["outputs"]
    live = EnsembleModule(members, "mean_prob", [1, 3])(student_train.inputs).detach()
    torch.testing.assert_close(soft, live, atol=1e-5, rtol=1e-5)

    ensemble = EnsembleModule(members, "mean_prob", [1, 3])
    cache_teacher(ensemble, student_train, tmp_path / "merged", progress=False)
    merged = [
        f"teachers=[{{checkpoint: {tmp_path / 'c0'}}}, {{checkpoint: {tmp_path / 'c1'}}}]",
        f"ensemble.store={tmp_path / 'merged'}",
        *small,
    ]
    run_ensemble(load_method_recipe(RECIPE, merged)[1], tmp_path / "run2", progress=False)
    assert (tmp_path / "run2" / "results.json").is_file()
    assert not (tmp_path / "run2" / "soft_targets.safetensors").exists()  # read from the store
    # other weights make another ensemble: refused before anything is written
    other = load_method_recipe(RECIPE, [*merged, "ensemble.weights=[1, 1]"])[1]
    with pytest.raises(StillroomError, match=r"ensemble\.store: store .* different teacher"):
        run_ensemble(other, tmp_path / "run3", progress=False)
    assert not (tmp_path / "run3").exists()


def test_a_damaged_merged_store_is_named_before_any_member_trains(
    tmp_path: Path, make_mlp, one_thread
) -> None:
    """Members trained in the run cannot be checked against the store until they exist, but the
    store's own bytes can: a flipped byte stops the run before the first member trains."""
    _, recipe = load_method_recipe(RECIPE, ["baseline=false", "distill.epochs=1"])
    student_train = prepare_data(recipe)[1]
    cache_teacher(make_mlp(outputs=10), student_train, tmp_path / "merged", progress=False)
    shard = next((tmp_path / "merged" / "shards").glob("*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = load_method_recipe(
        RECIPE, ["baseline=false", "distill.epochs=1", f"ensemble.store={tmp_path / 'merged'}"]
    )[1]
    with pytest.raises(StillroomError, match="recompute it with `stillroom cache"):
        run_ensemble(damaged, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "teacher_0").exists()
