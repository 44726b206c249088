"""Export: safetensors / torch.export / ONNX round trips and parity for an MLP student (from a real
run folder), a CNN and a tiny transformer; int8; loading without stillroom; the CLI's guards."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import assert_user_error, stillroom_in_process
from stillroom.cli import app
from stillroom.config import load_recipe
from stillroom.errors import StillroomError
from stillroom.export import EXPORT_FILES, Tolerance, export_model, export_run, open_run
from stillroom.methods.classic import run_recipe
from stillroom.models import SmallCNN, load_model
from stillroom.models.transformer import TinyTransformer

# export needs a trained student, not a good one: one epoch of each phase, large batches
TINY = [
    "teacher.channels=[4]",
    "teacher.hidden=[16]",
    "teacher.train.epochs=1",
    "student.hidden=[8]",
    "distill.epochs=1",
    "data.batch_size=256",
]
FORMATS = ("safetensors", "torch_export", "onnx")


# module-scoped: a second thread only waits on this shared 2-core machine (see conftest)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    run_recipe(load_recipe(None, TINY), out, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    return export_run(run_dir, int8=True).out_dir


def _tokens(n: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    """(n, length) token ids in 1..49 with a padded tail of varying length (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (n, length), generator=gen)
    for i in range(n):
        tokens[i, length - i % 5 :] = 0
    return tokens


@pytest.fixture(scope="module")
def module_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """{name: (model, check inputs, export folder)} for a CNN on images and a tiny transformer."""
    root = tmp_path_factory.mktemp("modules")
    torch.manual_seed(0)
    cnn = SmallCNN((1, 8, 8), channels=[4, 8], hidden=[16], num_outputs=10)
    # train-mode BatchNorm statistics away from their init: the export must carry the buffers
    with torch.no_grad():
        cnn(torch.randn(64, 1, 8, 8) * 3 + 1)
    transformer = TinyTransformer(vocab_size=50, num_outputs=3, max_len=16)
    cases = {
        "cnn": (cnn, torch.rand(40, 1, 8, 8)),
        "transformer": (transformer, _tokens(40)),
    }
    # a training-time feature tap: the export must drop it, and leave the caller's model as it was
    tapped: list[torch.Tensor] = []
    cnn.features[0].register_forward_hook(lambda module, args, out: tapped.append(out))
    result = {}
    for name, (model, inputs) in cases.items():
        out = root / name
        export_model(model, (inputs[:4],), out, check_inputs=(inputs,), config={"name": name})
        assert model.training, "export_model switched the caller's model to eval mode"
        result[name] = (model.eval(), inputs, out)
    assert tapped == [] and len(cnn.features[0]._forward_hooks) == 1
    return result


def test_export_run_writes_every_format_within_tolerance(run_dir: Path, exported: Path) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    test = open_run(run_dir).test
    assert manifest["passed"] and manifest["source"]["role"] == "student_kd"
    parity = manifest["parity"]
    assert parity["checked_samples"] == len(test)
    for fmt in FORMATS:
        check = parity["formats"][fmt]
        assert check["passed"] and check["max_abs_diff"] <= check["allowed"], fmt
    assert parity["formats"]["safetensors"]["max_abs_diff"] == 0.0
    student = load_model(run_dir / "student_kd")[0].eval()
    with torch.no_grad():
        scale = student(test.inputs).abs().max().item()
    assert parity["tolerance"]["atol"] == 1e-4 and parity["tolerance"]["rtol"] == 1e-5
    assert parity["tolerance"]["allowed"] == pytest.approx(1e-4 + 1e-5 * scale)
    for name, info in manifest["files"].items():
        data = (exported / name).read_bytes()
        assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(manifest["files"]) == set(EXPORT_FILES) - {"manifest.json"}
    # the student alone: its weights are the run's, byte for byte, and model.json rebuilds it
    assert (exported / "model.safetensors").read_bytes() == (
        run_dir / "student_kd" / "model.safetensors"
    ).read_bytes()
    _, meta = load_model(exported)
    assert meta["spec"] == json.loads((run_dir / "student_kd" / "model.json").read_text())["spec"]
    assert manifest["inputs"] == [
        {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    ]


def test_int8_accuracy_is_reported_next_to_fp32(run_dir: Path, exported: Path) -> None:
    int8 = json.loads((exported / "manifest.json").read_text())["int8"]
    run = open_run(run_dir)
    student, _ = run.load("student_kd")
    with torch.no_grad():
        fp32 = (student(run.test.inputs).argmax(1) == run.test.targets).float().mean().item()
    session = ort.InferenceSession(str(exported / "model_int8.onnx"))
    logits = session.run(None, {"input": run.test.inputs.numpy()})[0]
    accuracy = float((logits.argmax(1) == run.test.targets.numpy()).mean())
    assert int8["metric"] == "accuracy"
    assert int8["fp32"] == pytest.approx(fp32) and int8["int8"] == pytest.approx(accuracy)
    # dynamic int8 moves logits a little; a sane quantisation keeps nearly every decision
    assert abs(int8["int8"] - int8["fp32"]) <= 0.05
    assert int8["top1_agreement_with_fp32"] >= 0.9
    assert (exported / "model_int8.onnx").stat().st_size < (exported / "model.onnx").stat().st_size


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_module_exports_round_trip(module_exports: dict, name: str) -> None:
    model, inputs, out = module_exports[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] and manifest["int8"] is None
    assert json.loads((out / "model.json").read_text())["name"] == name
    # a batch size never seen while tracing: the batch dimension is dynamic in both formats
    fresh = inputs[7:30]
    with torch.no_grad():
        expected = model(fresh)
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(program(fresh), expected, atol=1e-4, rtol=0)
    session = ort.InferenceSession(str(out / "model.onnx"))
    onnx_out = torch.from_numpy(session.run(None, {"input": fresh.numpy()})[0])
    torch.testing.assert_close(onnx_out, expected, atol=1e-4, rtol=0)
    for fmt in FORMATS:
        assert manifest["parity"]["formats"][fmt]["max_abs_diff"] < 1e-4, fmt


def test_exported_models_load_without_stillroom(
    exported: Path, module_exports: dict, tmp_path: Path
) -> None:
    """A deployment machine has torch / onnxruntime but not stillroom: every file must load there."""
    run_inputs = torch.rand(5, 1, 8, 8)
    student, _ = load_model(exported)
    _, tokens, transformer_dir = module_exports["transformer"]
    transformer = module_exports["transformer"][0]
    with torch.no_grad():
        save_file(
            {
                "student_in": run_inputs,
                "student_out": student.eval()(run_inputs),
                "tokens": tokens[:6],
                "transformer_out": transformer(tokens[:6]),
            },
            str(tmp_path / "expected.safetensors"),
        )
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class NoStillroom(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "stillroom" or name.startswith("stillroom."):
                    raise ImportError("stillroom is not installed here")
                return None

        sys.meta_path.insert(0, NoStillroom())
        try:
            import stillroom  # noqa: F401
            raise SystemExit("the import blocker did not work")
        except ImportError:
            pass

        import json
        import onnxruntime as ort
        import torch
        from safetensors.torch import load_file
        from torch import nn

        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        x, want = expected["student_in"], expected["student_out"]
        export = {str(exported)!r}
        config = json.load(open(export + "/model.json"))
        assert config["spec"]["kind"] == "mlp" and config["spec"]["hidden"] == [8]

        # a freshly written module with the same layer layout as stillroom's MLP
        class Student(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(
                    nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 10)
                )

            def forward(self, x):
                return self.net(x)

        student = Student().eval()
        student.load_state_dict(load_file(export + "/model.safetensors"), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(student(x), want)
            program = torch.export.load(export + "/model.pt2").module()
            torch.testing.assert_close(program(x), want, atol=1e-4, rtol=0)
        for name in ("model.onnx", "model_int8.onnx"):
            session = ort.InferenceSession(export + "/" + name)
            out = torch.from_numpy(session.run(None, {{"input": x.numpy()}})[0])
            atol = 1e-4 if name == "model.onnx" else 0.5
            torch.testing.assert_close(out, want, atol=atol, rtol=0)

        transformer = {str(transformer_dir)!r}
        tokens, want = expected["tokens"], expected["transformer_out"]
        with torch.no_grad():
            program = torch.export.load(transformer + "/model.pt2").module()
            torch.testing.assert_close(program(tokens), want, atol=1e-4, rtol=0)
        session = ort.InferenceSession(transformer + "/model.onnx")
        out = torch.from_numpy(session.run(None, {{"input": tokens.numpy()}})[0])
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
        assert "stillroom" not in sys.modules
        print("loaded without stillroom")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "loaded without stillroom" in result.stdout


def test_parity_beyond_the_tolerance_fails_loudly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), channels=[2], hidden=[], num_outputs=3)
    inputs = torch.rand(8, 1, 8, 8)
    # a negative bound no export can meet: the failure path, whatever the float rounding
    with pytest.raises(StillroomError, match="more than the tolerance") as info:
        export_model(model, inputs, tmp_path / "out", tolerance=Tolerance(atol=-1.0, rtol=0.0))
    assert "for inspection" in str(info.value)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["passed"] is False


def test_export_refuses_to_overwrite(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    with pytest.raises(StillroomError, match="already exists; pass --force"):
        export_run(run_dir)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(StillroomError, match="--force only replaces an export folder"):
        export_run(run_dir, precious, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_export_cli_replaces_only_with_force(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    """The command end to end (in-process: the subprocess route is covered by the error tests)."""
    out = tmp_path / "cli_export"
    shutil.copytree(exported, out)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert isinstance(result.exception, StillroomError)
    assert "already exists; pass --force" in str(result.exception)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and "parity on" in result.output
    assert str(out / "manifest.json") in result.output
    # the forced rerun had no --int8: no stale int8 file or manifest entry is left behind
    assert json.loads((out / "manifest.json").read_text())["int8"] is None
    assert not (out / "model_int8.onnx").exists()


def test_bad_run_dirs(run_dir: Path, tmp_path: Path) -> None:
    """Every bad RUN_DIR is a StillroomError with a fix, for export and report alike."""
    from stillroom.report import build_report

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cases = {
        tmp_path / "missing": "does not exist",
        a_file: "is a file",
        empty: "is not a stillroom run folder: it holds no config.yaml",
        unfinished: "student_kd/model.json: the run has not finished",
    }
    for path, fragment in cases.items():
        with pytest.raises(StillroomError, match=fragment):
            export_run(path, tmp_path / "out")
        with pytest.raises(StillroomError, match=fragment):
            build_report(path, tmp_path / "out")


@pytest.mark.parametrize(
    ("command", "case", "fragment"),
    [
        ("report", "missing", "run folder {path} does not exist; check the path"),
        ("export", "demo", "is a `stillroom demo` folder holding several runs; point at one"),
    ],
)
def test_bad_run_dir_through_the_cli(
    tmp_path: Path, command: str, case: str, fragment: str
) -> None:
    path = tmp_path / case
    if case != "missing":
        path.mkdir()
    if case == "demo":
        (path / "demo.json").write_text("{}")
        (path / "all_labels").mkdir()
        (path / "all_labels" / "config.yaml").write_text("")
    assert_user_error(stillroom_in_process(command, path), fragment.format(path=path))


def test_transformer_shapes() -> None:
    model = TinyTransformer(vocab_size=50, num_outputs=3, max_len=16).eval()
    tokens = _tokens(6)
    with torch.no_grad():
        out = model(tokens)
        # padding is ignored: appending more padding leaves every output unchanged
        padded = torch.cat([tokens, torch.zeros(6, 3, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(padded), out, atol=1e-5, rtol=1e-5)
    assert out.shape == (6, 3)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    assert torch.isfinite(out).all()


def test_a_run_of_another_method_is_refused_in_one_line(tmp_path: Path) -> None:
    from stillroom.export.run_folder import open_run

    (tmp_path / "config.yaml").write_text("method: multitask\nname: mt\n")
    with pytest.raises(
        StillroomError, match=r"is a 'multitask' run that has not finished \(no summary.json\)"
    ):
        open_run(tmp_path)


def test_a_bare_model_folder_exports_checked_on_random_inputs(tmp_path: Path) -> None:
    """Students of other methods (an exit, a generation, a member) are model folders: export
    takes them directly, checking parity on seeded random inputs."""
    from stillroom.models import build_model, save_model

    spec = {"kind": "mlp", "hidden": [16], "dropout": 0.0}
    torch.manual_seed(0)
    folder = tmp_path / "student"
    save_model(
        build_model(spec, (1, 8, 8), 10), spec, folder, input_shape=[1, 8, 8], num_outputs=10
    )
    result = stillroom_in_process("export", folder)
    assert result.returncode == 0, result.stderr
    assert "random inputs" in result.stdout
    manifest = json.loads((folder / "export" / "manifest.json").read_text())
    assert manifest["source"]["split"] == "256 random inputs"
    assert manifest["parity"]["checked_samples"] == 256
    for name in ("model.safetensors", "model.onnx", "model.pt2", "model.json"):
        assert (folder / "export" / name).is_file(), name


def test_a_model_with_several_heads_exports_them_as_named_outputs(tmp_path: Path) -> None:
    """A multi-task student (a dict of outputs) exports every head, named, with one parity
    check over all of them; ONNX Runtime returns them by name."""
    from stillroom.models import build_model, save_model
    from stillroom.models.multitask import multitask_spec

    spec = multitask_spec({"a": ("classification", 3), "b": ("regression", 1)}, hidden=[8])
    folder = tmp_path / "multitask"
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), 4)
    save_model(model, spec, folder, input_shape=[1, 8, 8], num_outputs=4)
    result = stillroom_in_process("export", folder)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((folder / "export" / "manifest.json").read_text())
    assert manifest["outputs"] == [
        {"name": "a", "shape": ["batch", 3]},
        {"name": "b", "shape": ["batch", 1]},
    ]
    assert manifest["passed"] and set(manifest["parity"]["formats"]) == {
        "safetensors",
        "torch_export",
        "onnx",
    }
    session = ort.InferenceSession(str(folder / "export" / "model.onnx"))
    x = torch.rand(5, 1, 8, 8)
    a, b = session.run(["a", "b"], {"input": x.numpy()})
    with torch.no_grad():
        eager = model.eval()(x)
    assert torch.allclose(torch.from_numpy(a), eager["a"], atol=1e-5)
    assert torch.allclose(torch.from_numpy(b), eager["b"], atol=1e-5)
