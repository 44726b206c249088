"""Models from outside the MODELS table: a user's factory, ONNX graphs and skops estimators."""

from __future__ import annotations

import itertools
import pickle
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
import torch
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LinearRegression
from torch import nn

from stillroom.errors import StillroomError
from stillroom.models.external import OnnxModule, SklearnModule
from stillroom.models.factory import build_from_factory, resolve_factory

_names = itertools.count()

FACTORY_SOURCE = """
from torch import nn

class Net(nn.Module):
    def __init__(self, hidden, input_shape, num_outputs):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden),
                                  nn.Linear(hidden, num_outputs))

    def forward(self, x):
        return self.body(x)

def build(hidden, input_shape, num_outputs):
    return Net(hidden, input_shape, num_outputs)

def fixed(width=3):
    return nn.Linear(4, width)

def bad(hidden):
    raise ValueError("first line\\nhidden must be even")

def not_a_module():
    return (1, 2)

class Models:
    @staticmethod
    def small(num_outputs):
        return nn.Linear(2, num_outputs)

VERSION = 3
"""


def write_module(folder: Path, source: str, prefix: str = "user_models") -> str:
    """Write `source` as a uniquely named module in `folder`; returns its name."""
    name = f"{prefix}_{next(_names)}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
def models(tmp_path: Path) -> str:
    return write_module(tmp_path, FACTORY_SOURCE)


# --- factory ------------------------------------------------------------------------------------


def test_factory_gets_data_sizes_only_when_it_declares_them(models: str, tmp_path: Path) -> None:
    net = build_from_factory(f"{models}:build", {"hidden": 5}, (4,), 3, [tmp_path])
    assert net(torch.zeros(2, 4)).shape == (2, 3)
    # no input_shape / num_outputs parameters: called with the recipe's kwargs alone
    assert build_from_factory(f"{models}:fixed", {}, (9, 9), 10, [tmp_path]).out_features == 3
    assert (
        build_from_factory(f"{models}:fixed", {"width": 2}, (4,), 2, [tmp_path]).out_features == 2
    )
    # a class is a factory; a dotted attribute reaches a static method
    net = build_from_factory(f"{models}:Net", {"hidden": 2}, (4,), 6, [tmp_path])
    assert net(torch.zeros(1, 4)).shape == (1, 6)
    small = build_from_factory(f"{models}:Models.small", {}, (2,), 7, [tmp_path])
    assert small.out_features == 7


def test_factory_search_paths_are_restored_and_edits_are_seen(tmp_path: Path) -> None:
    import sys

    before = list(sys.path)
    name = write_module(tmp_path, "from torch import nn\ndef f():\n    return nn.Linear(1, 1)\n")
    assert resolve_factory(f"{name}:f", [tmp_path])().out_features == 1
    assert sys.path == before
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\ndef f():\n    return nn.Linear(1, 4)\n"
    )
    assert resolve_factory(f"{name}:f", [tmp_path])().out_features == 4
    # the same module name in another folder is that folder's module, not the cached one
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{name}.py").write_text(
        "from torch import nn\ndef f():\n    return nn.Linear(1, 9)\n"
    )
    assert resolve_factory(f"{name}:f", [other])().out_features == 9
    sys.modules.pop(name, None)


@pytest.mark.parametrize("ref", ["my_models", "my_models:", ":f", "a/b.py:f", "m:f:g"])
def test_factory_ref_needs_module_colon_function(ref: str) -> None:
    with pytest.raises(StillroomError, match="must look like module:function"):
        resolve_factory(ref)


def test_factory_missing_module_names_the_folders(tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match=rf"not found \(looked in {tmp_path}") as err:
        resolve_factory("no_such_module_xyz:f", [tmp_path])
    assert "\n" not in str(err.value)


def test_factory_module_importing_something_missing_names_it(tmp_path: Path) -> None:
    name = write_module(tmp_path, "import not_installed_pkg_xyz\n")
    with pytest.raises(StillroomError, match=r"imports 'not_installed_pkg_xyz', which is not"):
        resolve_factory(f"{name}:f", [tmp_path])


def test_factory_module_that_raises_while_importing(tmp_path: Path) -> None:
    name = write_module(tmp_path, "raise RuntimeError('line one\\nno GPU here')\n")
    with pytest.raises(StillroomError, match="raised RuntimeError while importing: no GPU here"):
        resolve_factory(f"{name}:f", [tmp_path])


def test_factory_missing_attribute_lists_callables(models: str, tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match="did you mean 'build'") as err:
        resolve_factory(f"{models}:buidl", [tmp_path])
    assert "Models, Net, bad, build, fixed, not_a_module" in str(err.value)
    assert "VERSION" not in str(err.value) and "nn" not in str(err.value).split("defines:")[1]
    with pytest.raises(StillroomError, match="did you mean 'small'"):
        resolve_factory(f"{models}:Models.smal", [tmp_path])


def test_factory_not_callable(models: str, tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match="is a int, not a function or class"):
        resolve_factory(f"{models}:VERSION", [tmp_path])


def test_factory_kwargs_it_does_not_take(models: str, tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match="unexpected keyword argument 'hiden'") as err:
        build_from_factory(f"{models}:build", {"hiden": 5}, (4,), 3, [tmp_path])
    assert "it takes: hidden, input_shape, num_outputs" in str(err.value)
    with pytest.raises(StillroomError, match="missing a required argument: 'hidden'"):
        build_from_factory(f"{models}:build", {}, (4,), 3, [tmp_path])
    with pytest.raises(StillroomError, match="stillroom fills from the data"):
        build_from_factory(f"{models}:build", {"hidden": 1, "num_outputs": 2}, (4,), 3, [tmp_path])


def test_factory_that_raises_or_returns_something_else(models: str, tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match=r"raised ValueError: hidden must be even; check"):
        build_from_factory(f"{models}:bad", {"hidden": 3}, (4,), 3, [tmp_path])
    with pytest.raises(StillroomError, match=r"returned a tuple, not a torch nn.Module"):
        build_from_factory(f"{models}:not_a_module", {}, (4,), 3, [tmp_path])


# --- ONNX ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A (3, 4) -> 5 torch MLP and its ONNX export with a dynamic batch dim."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    path = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    with warnings.catch_warnings():
        # the TorchScript exporter: a second per graph, where the dynamo one takes several
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(2, 3, 4),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return model, path


def test_onnx_module_matches_torch(onnx_teacher: tuple[nn.Module, Path]) -> None:
    model, path = onnx_teacher
    teacher = OnnxModule(path)
    assert teacher.input_shape == (3, 4)
    assert teacher.parameter_count == sum(p.numel() for p in model.parameters())
    assert list(teacher.parameters()) == []
    x = torch.randn(7, 3, 4)
    with torch.inference_mode():
        out = teacher.eval()(x)
    assert out.dtype == torch.float32 and out.shape == (7, 5)
    torch.testing.assert_close(out, model(x).detach(), atol=1e-5, rtol=1e-5)
    teacher.train()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x.double()), out, atol=1e-5, rtol=1e-5)
    teacher.check_fits((3, 4), 5)


def test_onnx_check_fits_names_both_shapes(onnx_teacher: tuple[nn.Module, Path]) -> None:
    teacher = OnnxModule(onnx_teacher[1])
    with pytest.raises(StillroomError, match=r"shape \(\?, 3, 4\)|shape \(3, 4\).*\(12,\)"):
        teacher.check_fits((12,), 5)
    with pytest.raises(StillroomError, match=r"takes inputs of shape \(3, 4\).*are \(4, 3\)"):
        teacher.check_fits((4, 3), 5)
    with pytest.raises(StillroomError, match=r"outputs of shape \(5,\).*has 10 outputs"):
        teacher.check_fits((3, 4), 10)


def test_onnx_bad_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf\x00\xff" * 10)
    with pytest.raises(StillroomError, match=r"cannot read .*garbage.onnx as an ONNX model") as err:
        OnnxModule(garbage)
    assert "\n" not in str(err.value)
    with pytest.raises(StillroomError, match="does not exist"):
        OnnxModule(tmp_path / "missing.onnx")


# --- scikit-learn via skops ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tabular() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    return x, np.array(["cat", "dog", "emu"])[rng.integers(0, 3, 80)], x @ rng.normal(size=6)


@pytest.fixture(scope="module")
def boosted(tabular, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    x, labels, _ = tabular
    estimator = GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0)
    estimator.fit(x, labels)
    path = tmp_path_factory.mktemp("skops") / "gbm.skops"
    sio.dump(estimator, path)
    return estimator, path


def test_sklearn_classifier_gives_log_probabilities(tabular, boosted) -> None:
    (x, _, _), (estimator, path) = tabular, boosted
    teacher = SklearnModule(path, "classification", ["cat", "dog", "emu"])
    assert list(teacher.parameters()) == []
    nodes = sum(tree.tree_.node_count for tree in estimator.estimators_.ravel())
    assert teacher.parameter_count == nodes
    inputs = torch.from_numpy(x[:10]).float().reshape(10, 2, 3)  # flattened to 6 features
    with torch.inference_mode():
        logits = teacher(inputs)
    expected = estimator.predict_proba(inputs.reshape(10, 6).double().numpy())
    np.testing.assert_allclose(logits.softmax(1).numpy(), expected, atol=1e-5)
    teacher.check_fits((2, 3), 3)


def test_sklearn_classes_are_reordered_to_the_data(tabular, boosted) -> None:
    (x, _, _), (estimator, path) = tabular, boosted
    teacher = SklearnModule(path, "classification", ["emu", "cat", "dog"])
    proba = teacher(torch.from_numpy(x[:5])).softmax(1).numpy()
    np.testing.assert_allclose(proba, estimator.predict_proba(x[:5])[:, [2, 0, 1]], atol=1e-5)
    with pytest.raises(StillroomError, match=r"classes \['cat', 'dog', 'emu'\].*\['cat', 'dog'\]"):
        SklearnModule(path, "classification", ["cat", "dog"])


def test_sklearn_regressor_and_feature_mismatch(tabular, tmp_path: Path) -> None:
    x, _, y = tabular
    estimator = LinearRegression().fit(x, y)
    sio.dump(estimator, tmp_path / "linear.skops")
    teacher = SklearnModule(tmp_path / "linear.skops", "regression")
    assert teacher.parameter_count == 7
    out = teacher(torch.from_numpy(x[:4]))
    assert out.shape == (4, 1) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0].numpy(), estimator.predict(x[:4]), rtol=1e-5)
    teacher.check_fits((6,), 1)
    with pytest.raises(StillroomError, match=r"fitted on 6 features .*\(2, 4\) flatten to 8"):
        teacher.check_fits((2, 4), 1)
    with pytest.raises(StillroomError, match="gives 1 targets but the data has 2"):
        teacher.check_fits((6,), 2)
    with pytest.raises(StillroomError, match="has no predict_proba"):
        SklearnModule(tmp_path / "linear.skops", "classification")


def test_sklearn_refuses_pickles_and_untrusted_types(tabular, tmp_path: Path) -> None:
    x, _, y = tabular
    estimator = LinearRegression().fit(x, y)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(estimator))
    with pytest.raises(StillroomError, match=r"model.pkl is not a skops file; stillroom never"):
        SklearnModule(tmp_path / "model.pkl", "regression")
    # a type outside scikit-learn is listed, never loaded
    estimator.extra_ = Path("x")
    sio.dump(estimator, tmp_path / "odd.skops")
    with pytest.raises(StillroomError, match=r"does not trust: pathlib.*PosixPath|does not trust"):
        SklearnModule(tmp_path / "odd.skops", "regression")
    with pytest.raises(StillroomError, match="serves task classification or regression"):
        SklearnModule(tmp_path / "odd.skops", "embedding")
