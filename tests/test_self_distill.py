"""Self-distillation (Be Your Own Teacher): the terms, detachment of the deepest exit, standalone
exits equal to the network's outputs, the Python API, and the recipe through the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import assert_user_error, stillroom_in_process
from stillroom.cli import app
from stillroom.data import Splits, make_loader
from stillroom.errors import StillroomError
from stillroom.export import export_model
from stillroom.methods import load_method_recipe
from stillroom.methods.self_distill import run_self_distill, self_distill, self_distillation_terms
from stillroom.models import count_parameters, load_model, save_model
from stillroom.models.multiexit import ExitNetwork, MultiExitResNet, exit_model
from stillroom.objective import ObjectiveStudent, StepOutputs, build_objective
from stillroom.pipeline import prepare_data
from stillroom.results import read_summary
from stillroom.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).parent.parent / "recipes" / "digits_self_distill.yaml"
EXITS = ["exit1", "exit2", "final"]
TINY = [
    "self_distill.widths=[4,8]",
    "self_distill.blocks=[1,1]",
    "distill.epochs=1",
    "data.batch_size=256",
]


def _network(seed: int = 0, **kwargs) -> MultiExitResNet:
    torch.manual_seed(seed)
    return MultiExitResNet((1, 8, 8), [4, 8, 8], [1, 1, 1], 10, **kwargs)


def test_terms_every_exit_learns_labels_shallow_ones_the_deepest() -> None:
    layers = {"exit1": "exits.0.bottleneck", "exit2": "exits.1.bottleneck"}
    terms = self_distillation_terms(
        EXITS,
        alpha=0.3,
        temperature=2.0,
        feature_weight=0.1,
        feature_layers=layers,
        final_feature="stages.2",
    )
    by_name = {t.name: t for t in terms}
    assert list(by_name) == [
        "hard_label:exit1",
        "hard_label:exit2",
        "hard_label:final",
        "soft_target:exit1",
        "soft_target:exit2",
        "hint:exit1",
        "hint:exit2",
    ]
    for name in EXITS:
        assert by_name[f"hard_label:{name}"].output == name
        assert by_name[f"hard_label:{name}"].weight == pytest.approx(0.7)
    for name in ("exit1", "exit2"):
        kd, hint = by_name[f"soft_target:{name}"], by_name[f"hint:{name}"]
        assert (kd.output, kd.teacher_output, kd.source) == (name, "final", "student")
        assert (kd.weight, kd.temperature) == (0.3, 2.0)
        assert (hint.student, hint.teacher, hint.source) == (layers[name], "stages.2", "student")
        assert hint.weight == 0.1
    # feature_weight 0: no hint terms at all
    plain = self_distillation_terms(EXITS, alpha=0.5, temperature=3.0)
    assert [t.kind for t in plain].count("hint") == 0


def test_distillation_terms_leave_the_deepest_exit_alone() -> None:
    """KD and hint terms read the deepest exit detached: its head and last stage get no gradient
    from them, while the shallow exits and the shared trunk below them do."""
    model = _network().train()
    x = torch.randn(6, 64)
    terms = self_distillation_terms(
        EXITS,
        alpha=1.0,  # the hard-label terms get weight 0: only distillation reaches the weights
        temperature=2.0,
        feature_weight=1.0,
        feature_layers=dict(zip(EXITS[:2], model.feature_layers("map")[0].values(), strict=True)),
        final_feature=model.feature_layers("map")[1],
    )
    built = build_objective(
        terms, "classification", model, None, x, dict.fromkeys(EXITS, "classification")
    )
    wrapped = ObjectiveStudent(model, built)
    outputs, features = wrapped(x)
    step = StepOutputs(outputs, None, torch.zeros(6, dtype=torch.long), features)
    distillation = [t for t in built if t.weight > 0]
    assert {t.name for t in distillation} == {
        "soft_target:exit1",
        "soft_target:exit2",
        "hint:exit1",
        "hint:exit2",
    }
    values = {t.name: t.compute(step) for t in distillation}
    # the KD term is Hinton's KL(final_T || exit_T) * T**2, the final logits as constants
    T = 2.0
    reference = (
        F.kl_div(
            F.log_softmax(outputs["exit1"] / T, dim=1),
            F.softmax(outputs["final"].detach() / T, dim=1),
            reduction="batchmean",
        )
        * T**2
    )
    assert torch.allclose(values["soft_target:exit1"], reference, atol=1e-6)
    sum(values.values()).backward()

    def grad_norm(prefix: str) -> float:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        return sum(0.0 if g is None else g.abs().sum().item() for g in grads)

    assert grad_norm("head.") == 0.0
    assert grad_norm("stages.2.") == 0.0  # only the deepest exit runs through the last stage
    for reached in ("exits.0.", "exits.1.", "stages.0.", "stages.1.", "stem."):
        assert grad_norm(reached) > 0.0, reached


def test_exit_model_is_the_network_up_to_that_exit(tmp_path: Path) -> None:
    model = _network().eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        outputs = model(x)
        assert list(outputs) == EXITS
        for name in EXITS:
            standalone = exit_model(model, name).eval()
            assert isinstance(standalone(x), torch.Tensor)
            assert torch.equal(standalone(x), outputs[name])
            # saved with its spec, load_model rebuilds the same standalone network
            spec = {"kind": "multiexit", "widths": [4, 8, 8], "blocks": [1, 1, 1], "exit": name}
            save_model(standalone, spec, tmp_path / name, input_shape=[1, 8, 8], num_outputs=10)
            loaded = load_model(tmp_path / name)[0].eval()
            assert torch.equal(loaded(x), outputs[name])
    shallow = exit_model(model, "exit1")
    assert isinstance(shallow, ExitNetwork)
    assert count_parameters(shallow) < count_parameters(exit_model(model, "exit2"))
    with pytest.raises(StillroomError, match="no exit 'exit9'; its exits are: exit1, exit2, final"):
        exit_model(model, "exit9")


@pytest.mark.slow  # ~5 s of CPU, most of it the ONNX exporter; test_export covers the machinery
def test_standalone_exit_exports_within_tolerance(tmp_path: Path) -> None:
    shallow = exit_model(_network(), "exit1").eval()
    x = torch.randn(16, 64)
    result = export_model(shallow, x[:2], tmp_path / "export", check_inputs=x)
    assert all(check["passed"] for check in result.manifest["parity"]["formats"].values())


def test_python_api_trains_every_exit(digits: Splits) -> None:
    train = make_loader(digits.train, 64, shuffle=True)
    val = make_loader(digits.val, 64, shuffle=False)
    result = self_distill(
        _network(),
        train,
        val,
        alpha=0.5,
        temperature=3.0,
        feature_weight=0.1,
        hint_at="pooled",  # exits.i.features (N, 8) -> pool (N, 8)
        epochs=2,
        lr=0.01,
        progress=False,
    )
    last = result.history[-1]
    for name in EXITS:
        assert 0.0 <= last[f"val/{name}/accuracy"] <= 1.0
    assert last["train/soft_target:exit1"] > 0 and "train/soft_target:final" not in last
    assert last["train/hint:exit2"] > 0 and "train/hint:final" not in last
    assert result.metric == "final/accuracy"


def test_bad_input_fails_in_one_line(digits: Splits) -> None:
    train = make_loader(digits.train, 64, shuffle=True)
    with pytest.raises(StillroomError, match="no exit 'exit7'; its exits are: exit1, exit2, final"):
        self_distill(_network(), train, exits=["exit7", "final"], epochs=1, progress=False)
    # an exit's pooled vector cannot be hinted toward the deepest stage's (N, C, H, W) map
    with pytest.raises(StillroomError, match=r"'exits.0.features' \(8,\) cannot be projected"):
        self_distill(
            _network(),
            train,
            exits=["exit1", "final"],
            feature_weight=1.0,
            feature_layers={"exit1": "exits.0.features"},
            final_feature="stages.2",
            epochs=1,
            progress=False,
        )


def test_hints_between_exits_of_different_widths_train_a_projector(tmp_path: Path) -> None:
    """A narrow exit (2 channels) hinted toward the deepest feature: the objective adds a
    projector (the deeper layer is the student's own, detached), trained and never saved."""
    _, recipe = load_method_recipe(
        RECIPE, [*TINY, "self_distill.exit_width=2", "self_distill.feature_weight=0.1"]
    )
    run_self_distill(recipe, tmp_path / "run", progress=False)
    record = json.loads(
        (tmp_path / "run" / "self_distilled" / "metrics.jsonl").read_text().splitlines()[-1]
    )
    hints = [key for key in record if key.startswith("train/") and "hint" in key]
    assert hints and all(math.isfinite(record[key]) for key in hints)
    saved = load_file(str(tmp_path / "run" / "self_distilled" / "model.safetensors"))
    assert not any("projector" in key for key in saved)


def test_cli_end_to_end(tmp_path: Path) -> None:
    """`stillroom distill` in-process (the subprocess route is the bad-input test below)."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["distill", str(RECIPE), *TINY, "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "exit1" in result.output and "supervised" in result.output
    # the result contract: every exit, the plain network; the report reads it
    summary = read_summary(out)
    assert [m.name for m in summary.models] == ["exit1", "final", "plain_scratch"]
    assert summary.primary == "final" and summary.model("exit1").role == "exit"
    page = (out / "report" / "report.html").read_text()
    assert "exit1" in page and "plain_scratch" in page and "Settings" in page
    assert json.loads((out / "report" / "report.json").read_text())["method"] == "self_distill"
    _, recipe = load_method_recipe(out / "config.yaml")
    # `stillroom export RUN_DIR` ships the exit the summary names
    exported = CliRunner().invoke(app, ["export", str(out), "-f", "onnx"])
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    final = json.loads((out / "results.json").read_text())["exits"]["final"]
    assert manifest["model"]["parameters"] == final["parameters"]
    # checked on the run's own test split, as a classic run's student is
    assert manifest["source"] == {
        "run_dir": str(out.resolve()),
        "role": "self_distilled/exits/final",
        "split": "test",
    }
    assert manifest["parity"]["checked_samples"] == len(prepare_data(recipe)[0].test)
    payload = json.loads((out / "results.json").read_text())
    assert list(payload["exits"]) == ["exit1", "final"]
    _, recipe = load_method_recipe(out / "config.yaml")
    test = make_loader(prepare_data(recipe)[0].test, 512, shuffle=False)
    for phase in ("self_distilled", "deeply_supervised"):
        assert (out / phase / "model.json").is_file()
        network = load_model(out / phase)[0]
        for name, row in payload["exits"].items():
            standalone = load_model(out / phase / "exits" / name)[0]
            # the table's numbers are those of the saved standalone exits
            assert row[phase] == pytest.approx(
                evaluate(standalone, test, "classification")["accuracy"]
            )
            assert row["parameters"] == count_parameters(standalone)
            assert row["latency_ms"] > 0
            x = torch.randn(3, 64)
            assert torch.allclose(standalone.eval()(x), network.eval()(x)[name])
    assert payload["exits"]["exit1"]["parameters"] < payload["exits"]["final"]["parameters"]
    scratch = payload["scratch"]
    assert scratch["parameters"] == payload["exits"]["final"]["parameters"]
    assert 0.0 <= scratch["accuracy"] <= 1.0
    assert (out / "scratch" / "model.json").is_file() and (out / "results.md").is_file()
    # --resume finds every phase finished: nothing retrains, the same numbers come back
    resumed = CliRunner().invoke(
        app, ["distill", str(RECIPE), *TINY, "--out", str(out), "--no-progress", "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    again_payload = json.loads((out / "results.json").read_text())
    for name, row in payload["exits"].items():
        assert again_payload["exits"][name]["self_distilled"] == row["self_distilled"]
    # a finished run is never overwritten silently
    again = CliRunner().invoke(
        app, ["distill", str(RECIPE), *TINY, "--out", str(out), "--no-progress"]
    )
    assert isinstance(again.exception, StillroomError) and "already exists" in str(again.exception)


def test_cli_unknown_exit_is_one_line(tmp_path: Path) -> None:
    result = stillroom_in_process(
        "distill", RECIPE, *TINY, "self_distill.select=exit7", "--out", tmp_path / "run"
    )
    assert_user_error(result, "self_distill.select: the network has no exit 'exit7'")
    assert not (tmp_path / "run").exists()
