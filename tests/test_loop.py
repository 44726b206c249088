"""End-to-end tests of the distillation loop `stillroom.train.loop.distill` through its Python API.

Every run is tiny (160 digits, MLP/CNN of a few thousand weights, a handful of epochs) so the whole
file stays fast on a laptop CPU.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stillroom.train.loop as loop
from stillroom.data import Splits, load_dataset, make_loader, split
from stillroom.errors import NonFiniteLossError, StillroomError
from stillroom.losses import IGNORE_INDEX
from stillroom.models import build_model
from stillroom.teachers import CachedTeacher, generate_soft_targets
from stillroom.train import distill, evaluate
from stillroom.train.checkpoint import latest_checkpoint
from stillroom.train.logging import MetricsLog

FAST = {"progress": False, "lr": 1e-2}


def _loaders(splits: Splits, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    return make_loader(splits.train, batch_size, shuffle=True), make_loader(splits.val, 64, False)


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# 1. the teacher is frozen -------------------------------------------------------------------------


def test_teacher_is_frozen(digits, make_mlp, tmp_path):
    torch.manual_seed(0)
    teacher = build_model({"kind": "cnn", "channels": [4]}, (1, 8, 8), 10)
    assert teacher.training  # a fresh module: BatchNorm would update its running stats if run so
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)

    train, val = _loaders(digits)
    result = distill(teacher, make_mlp(), train, val, run_dir=tmp_path / "run", epochs=2, **FAST)

    assert len(result.history) == 2
    _assert_same_weights(teacher.state_dict(), before)  # parameters and BatchNorm buffers
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())


# 2. a resumed run equals an uninterrupted one -----------------------------------------------------


class _Interrupt:
    """Wraps save_checkpoint: Ctrl-C either just after checkpoint `k` is written, or just before
    checkpoint `k + 1` (after that epoch's metrics line, so the resume must drop it)."""

    def __init__(self, k: int, when: str) -> None:
        self.k, self.when, self.real = k, when, loop.save_checkpoint

    def __call__(self, root, epoch, *args, **kwargs):
        if self.when == "before_next" and epoch == self.k + 1:
            raise KeyboardInterrupt
        folder = self.real(root, epoch, *args, **kwargs)
        if self.when == "after" and epoch == self.k:
            raise KeyboardInterrupt
        return folder


@pytest.mark.parametrize(
    ("grad_accum_steps", "when"),
    [(1, "after"), (2, "after"), (2, "before_next")],
)
def test_resume_matches_uninterrupted_run(
    digits, make_mlp, tmp_path, monkeypatch, grad_accum_steps, when
):
    epochs, k = 4, 2
    torch.manual_seed(1)
    teacher = build_model({"kind": "mlp", "hidden": [32]}, (1, 8, 8), 10)
    initial = make_mlp(hidden=[32], dropout=0.3)  # dropout: the RNG must replay after resuming
    kwargs = dict(
        epochs=epochs, scheduler="cosine", warmup_steps=2, grad_accum_steps=grad_accum_steps, **FAST
    )

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    whole = distill(teacher, copy.deepcopy(initial), *_loaders(digits), run_dir=run_a, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", _Interrupt(k, when))
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, copy.deepcopy(initial), *_loaders(digits), run_dir=run_b, **kwargs)
    monkeypatch.undo()
    assert json.loads((run_b / "checkpoints" / "latest.json").read_text())["epoch"] == k
    lines_at_crash = len(_read_metrics(run_b))
    assert lines_at_crash == (k if when == "after" else k + 1)

    # a fresh student object: everything it needs must come from the checkpoint
    resumed = distill(
        teacher,
        make_mlp(hidden=[32], dropout=0.3, seed=99),
        *_loaders(digits),
        run_dir=run_b,
        resume=True,
        **kwargs,
    )

    _assert_same_weights(resumed.student.state_dict(), whole.student.state_dict())
    last_a = load_file(str(run_a / "checkpoints" / f"epoch-{epochs:04d}" / "model.safetensors"))
    last_b = load_file(str(run_b / "checkpoints" / f"epoch-{epochs:04d}" / "model.safetensors"))
    _assert_same_weights(last_a, last_b)

    records_a, records_b = _read_metrics(run_a), _read_metrics(run_b)
    assert [r["epoch"] for r in records_b] == list(range(1, epochs + 1))  # no duplicated lines
    assert _without_timing(records_b) == _without_timing(records_a)  # same losses, lr, steps
    assert _without_timing(resumed.history) == _without_timing(whole.history)
    assert (resumed.best_epoch, resumed.best_value) == (whole.best_epoch, whole.best_value)
    assert records_a[-1]["step"] == epochs * math.ceil(5 / grad_accum_steps)


def test_resume_of_a_finished_run_trains_no_further(digits, make_mlp, tmp_path):
    train, val = _loaders(digits)
    first = distill(None, make_mlp(), train, val, run_dir=tmp_path, alpha=0.0, epochs=2, **FAST)
    again = distill(
        None,
        make_mlp(seed=5),
        train,
        val,
        run_dir=tmp_path,
        resume=True,
        alpha=0.0,
        epochs=2,
        **FAST,
    )
    _assert_same_weights(again.student.state_dict(), first.student.state_dict())
    assert [r["epoch"] for r in _read_metrics(tmp_path)] == [1, 2]


# 3. checkpoint files ------------------------------------------------------------------------------


def test_checkpoint_files_and_refusal_to_overwrite(digits, make_mlp, tmp_path):
    run_dir = tmp_path / "run"
    train, val = _loaders(digits)
    teacher = make_mlp(hidden=[32], seed=1)
    result = distill(teacher, make_mlp(), train, val, run_dir=run_dir, epochs=3, **FAST)

    ckpts = run_dir / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    assert latest == {"dir": "epoch-0003", "epoch": 3}
    folder = latest_checkpoint(ckpts)
    assert folder == ckpts / "epoch-0003"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch-0003", "latest.json"]  # old pruned
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 3 and state["step"] == 15
    assert len(state["history"]) == 3
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == result.student.state_dict().keys()
    assert "rng.torch" in load_file(str(folder / "optimizer.safetensors"))
    for name in ("best.safetensors", "metrics.jsonl", "train_args.json"):
        assert (run_dir / name).is_file(), name

    before = _files(run_dir)
    with pytest.raises(StillroomError, match="already holds a run"):
        distill(teacher, make_mlp(), train, val, run_dir=run_dir, epochs=3, **FAST)
    assert _files(run_dir) == before


# 4. a NaN stops training before it reaches the weights --------------------------------------------


class _NaNTeacher(nn.Module):
    """A linear teacher whose `nan_call`-th forward pass returns NaN logits."""

    def __init__(self, nan_call: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(64, 10)
        self.nan_call, self.calls = nan_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls == self.nan_call else out


def test_nan_teacher_output_stops_with_named_term_and_step(digits, make_mlp, tmp_path, monkeypatch):
    closed = []
    real_close = MetricsLog.close
    monkeypatch.setattr(MetricsLog, "close", lambda self: (closed.append(1), real_close(self)))
    run_dir = tmp_path / "run"
    student = make_mlp()
    train, val = _loaders(digits)
    # 5 batches per epoch: the 8th teacher call is step 8, in epoch 2
    with pytest.raises(NonFiniteLossError) as caught:
        distill(_NaNTeacher(nan_call=8), student, train, val, run_dir=run_dir, epochs=3, **FAST)
    message = str(caught.value)
    assert "'distillation'" in message
    assert "step 8 " in message and "epoch 2" in message
    assert str(run_dir / "checkpoints") in message
    assert closed, "the metrics log (TensorBoard writer) must be closed when training fails"

    folder = latest_checkpoint(run_dir / "checkpoints")
    assert folder is not None and folder.name == "epoch-0001"
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    make_mlp().load_state_dict(weights)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert [r["epoch"] for r in _read_metrics(run_dir)] == [1]


def test_nan_in_cached_teacher_is_caught(digits, make_mlp):
    teacher = make_mlp(hidden=[32], seed=1)
    cached = generate_soft_targets(teacher, make_loader(digits.train, 64, shuffle=False))
    cached.outputs[17] = float("nan")
    train, val = _loaders(digits)
    with pytest.raises(
        NonFiniteLossError, match=r"'distillation' became nan at step \d+ \(epoch 1\)"
    ):
        distill(cached, make_mlp(), train, val, epochs=2, **FAST)


# 5. early stopping --------------------------------------------------------------------------------


def _misleading_val(splits: Splits) -> DataLoader:
    """Validation labels shifted by one class: the better the student fits the training labels,
    the worse it scores, so its best epoch comes early and training stops by patience."""
    shifted = splits.val.subset(torch.arange(len(splits.val)))
    shifted = type(shifted)(
        shifted.inputs, (shifted.targets + 1) % 10, shifted.task, shifted.num_outputs, "shifted"
    )
    return make_loader(shifted, 64, shuffle=False)


@pytest.mark.parametrize("with_run_dir", [True, False])
def test_early_stopping_returns_best_epoch_weights(
    digits, make_mlp, tmp_path, with_run_dir, capsys
):
    epochs, patience = 20, 2
    train = make_loader(digits.train, 32, shuffle=True)
    val = _misleading_val(digits)
    kwargs = dict(alpha=0.0, scheduler="constant", **FAST)
    run_dir = tmp_path / "run" if with_run_dir else None
    result = distill(
        None, make_mlp(), train, val, run_dir=run_dir, epochs=epochs, patience=patience, **kwargs
    )

    accuracies = [r["val/accuracy"] for r in result.history]
    assert result.stopped_early
    said = " ".join(capsys.readouterr().out.split())
    assert f"stopped early after epoch {len(result.history)}: no better val accuracy" in said
    assert f"for {patience} epochs; keeping epoch {result.best_epoch}" in said
    assert len(result.history) < epochs
    assert len(result.history) == result.best_epoch + patience
    assert result.best_value == max(accuracies)
    assert accuracies.index(max(accuracies)) + 1 == result.best_epoch
    assert evaluate(result.student, val, "classification")["accuracy"] == result.best_value

    # the same run cut at the best epoch (constant lr, so the schedule does not depend on epochs)
    reference = distill(None, make_mlp(), train, val, epochs=result.best_epoch, **kwargs)
    _assert_same_weights(result.student.state_dict(), reference.student.state_dict())
    if with_run_dir:
        _assert_same_weights(result.student.state_dict(), load_file(str(run_dir / loop.BEST)))
        last = latest_checkpoint(run_dir / "checkpoints")
        assert last.name == f"epoch-{len(result.history):04d}"
        assert json.loads((last / "state.json").read_text())["stopped_early"] is True


# 6. cached teacher == live teacher ----------------------------------------------------------------


def test_cached_teacher_matches_live_teacher(digits, make_mlp):
    torch.manual_seed(2)
    teacher = build_model({"kind": "cnn", "channels": [4]}, (1, 8, 8), 10)
    initial = make_mlp(dropout=0.2)
    cached = generate_soft_targets(teacher, make_loader(digits.train, 64, shuffle=False))
    assert isinstance(cached, CachedTeacher) and len(cached) == len(digits.train)

    kwargs = dict(epochs=3, seed=7, **FAST)
    live = distill(teacher, copy.deepcopy(initial), *_loaders(digits), **kwargs)
    from_cache = distill(cached, copy.deepcopy(initial), *_loaders(digits), **kwargs)

    for key, value in live.student.state_dict().items():
        assert torch.allclose(from_cache.student.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for a, b in zip(live.history, from_cache.history, strict=True):
        assert a["train/distillation"] == pytest.approx(b["train/distillation"], rel=1e-5)


def test_cached_teacher_needs_indexed_loader(digits, make_mlp):
    cached = generate_soft_targets(make_mlp(seed=1), make_loader(digits.train, 64, shuffle=False))
    plain = DataLoader(TensorDataset(digits.train.inputs, digits.train.targets), batch_size=32)
    with pytest.raises(StillroomError, match="sample index"):
        distill(cached, make_mlp(), plain, epochs=1, **FAST)


# 7. user mistakes fail with StillroomError --------------------------------------------------------


@pytest.mark.parametrize("student_classes", [5, 12])
def test_teacher_student_class_mismatch(digits, make_mlp, student_classes):
    train, val = _loaders(digits)
    teacher = make_mlp(outputs=10, seed=1)
    with pytest.raises(StillroomError, match=rf"\(32, {student_classes}\).*\(32, 10\).*classes"):
        distill(teacher, make_mlp(outputs=student_classes), train, val, epochs=1, **FAST)


def test_alpha_without_teacher(digits, make_mlp, tmp_path):
    train, val = _loaders(digits)
    with pytest.raises(StillroomError, match=r"alpha=0\.5.*no teacher.*alpha=0"):
        distill(None, make_mlp(), train, val, run_dir=tmp_path / "run", alpha=0.5, **FAST)
    assert not (tmp_path / "run").exists()  # refused before touching the disk


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader(TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long)), 4),
        DataLoader(
            TensorDataset(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)),
            4,
            drop_last=True,
        ),
    ],
    ids=["empty-dataset", "all-dropped"],
)
def test_empty_train_loader(make_mlp, loader):
    with pytest.raises(StillroomError, match="no batches"):
        distill(make_mlp(seed=1), make_mlp(), loader, epochs=1, **FAST)


# 8. regression ------------------------------------------------------------------------------------


def test_regression_task_reports_rmse():
    data = split(load_dataset("diabetes"), test_fraction=0.2, val_fraction=0.2, seed=0)
    train, val = make_loader(data.train, 32, shuffle=True), make_loader(data.val, 128, False)
    torch.manual_seed(0)
    teacher = build_model({"kind": "mlp", "hidden": [16]}, data.train.input_shape, 1)
    student = build_model({"kind": "mlp", "hidden": [8]}, data.train.input_shape, 1)
    result = distill(
        teacher, student, train, val, task="regression", loss="regression", epochs=3, **FAST
    )

    assert result.metric == "rmse"
    rmses = [r["val/rmse"] for r in result.history]
    assert all(math.isfinite(v) and v > 0 for v in rmses)
    assert "val/accuracy" not in result.history[0]
    assert result.best_value == min(rmses)
    assert evaluate(result.student, val, "regression")["rmse"] == pytest.approx(result.best_value)


# 9. plain (inputs, targets) loaders ---------------------------------------------------------------


def test_plain_tuple_loaders_with_live_teacher(digits, make_mlp):
    def plain(data, batch_size, shuffle):
        return DataLoader(TensorDataset(data.inputs, data.targets), batch_size, shuffle=shuffle)

    teacher = make_mlp(hidden=[32], seed=1)
    initial = make_mlp()
    kwargs = dict(epochs=2, **FAST)
    result = distill(
        teacher,
        copy.deepcopy(initial),
        plain(digits.train, 32, True),
        plain(digits.val, 64, False),
        **kwargs,
    )
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(r["train/distillation"] > 0 for r in result.history)
    assert 0.0 <= result.best_value <= 1.0

    # the index a make_loader batch carries changes nothing for a live teacher
    indexed = distill(teacher, copy.deepcopy(initial), *_loaders(digits), **kwargs)
    _assert_same_weights(result.student.state_dict(), indexed.student.state_dict())


# 10. metrics.jsonl and the blend ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_metrics_records_and_blend(digits, make_mlp, tmp_path, alpha):
    # few labels: hidden ones must count in neither the hard-label term nor the accuracy
    train_data = digits.train
    hidden = train_data.targets.clone()
    hidden[::2] = IGNORE_INDEX
    train_data = type(train_data)(train_data.inputs, hidden, "classification", 10, "few")
    train = make_loader(train_data, 32, shuffle=True)
    val = make_loader(digits.val, 64, shuffle=False)
    run_dir = tmp_path / "run"
    result = distill(
        make_mlp(hidden=[32], seed=1),
        make_mlp(),
        train,
        val,
        run_dir=run_dir,
        alpha=alpha,
        temperature=2.0,
        epochs=3,
        **FAST,
    )

    records = _read_metrics(run_dir)
    assert records == result.history
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("train/loss", "train/distillation", "train/hard_label", "val/accuracy"):
            assert key in r and math.isfinite(r[key]), key
        blend = alpha * r["train/distillation"] + (1 - alpha) * r["train/hard_label"]
        assert r["train/loss"] == pytest.approx(blend, rel=1e-6, abs=1e-9)
        assert r["train/hard_label"] > 0
        # with a teacher present the distillation term is logged even at alpha=0, as a monitor
        assert r["train/distillation"] > 0
    assert json.loads((run_dir / "train_args.json").read_text())["alpha"] == alpha
