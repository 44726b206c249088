"""Reference architectures, the table that builds them from a spec, and safetensors save/load.

A model spec is a small JSON-able dict, e.g. {"kind": "mlp", "hidden": [32]}; together with the
data's input shape and output count it rebuilds the module exactly, so a saved student is
`model.safetensors` + `model.json` and never a pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from stillroom.dense.models import build_fcn
from stillroom.errors import StillroomError
from stillroom.io import atomic_save_tensors, atomic_write_text
from stillroom.models.cnn import SmallCNN
from stillroom.models.external import OnnxModule, SklearnModule
from stillroom.models.factory import build_from_factory
from stillroom.models.hf import build_hf, saved_spec
from stillroom.models.mlp import MLP
from stillroom.models.multiexit import build_multiexit
from stillroom.models.multitask import build_multitask
from stillroom.models.preprocessed import Preprocessed, Standardized, build_preprocessed
from stillroom.models.resnet import ResNet


def _build_mlp(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return MLP(input_shape, list(spec.get("hidden", [64])), num_outputs, spec.get("dropout", 0.0))


def _build_cnn(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return SmallCNN(
        input_shape,
        list(spec.get("channels", [32, 64])),
        list(spec.get("hidden", [128])),
        num_outputs,
        spec.get("dropout", 0.0),
    )


def _build_resnet(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    # one int means that many blocks in every stage, so a spec can change widths alone
    blocks = spec.get("blocks", 1)
    blocks = blocks if isinstance(blocks, int) else list(blocks)
    return ResNet(input_shape, list(spec.get("widths", [16, 32, 64])), blocks, num_outputs)


_ALLOWED_FACTORIES: set[str] = set()


def allow_factory(ref: str) -> None:
    """Let `build_model` import the user's factory `ref`: called where the user names it (their
    recipe, or --trust-factory on the command line), never for a spec read from a received file."""
    _ALLOWED_FACTORIES.add(ref)


def trust_factories() -> None:
    """--trust-factory: let `build_model` import any factory a model folder names (the user asked
    for it on the command line, for folders they received)."""
    _ALLOWED_FACTORIES.add("*")


def _build_factory(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    ref = spec["factory"]
    if ref not in _ALLOWED_FACTORIES and "*" not in _ALLOWED_FACTORIES:
        raise StillroomError(
            f"this model is built by the factory {ref}: rebuilding it imports and runs that code; "
            "if you trust it, pass --trust-factory (Python: stillroom.models.allow_factory)"
        )
    paths = [Path(p) for p in spec.get("search_paths", [])] + [Path.cwd()]
    return build_from_factory(ref, dict(spec.get("kwargs", {})), input_shape, num_outputs, paths)


def _build_onnx(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return OnnxModule(Path(spec["path"]))


def _build_sklearn(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    return SklearnModule(Path(spec["path"]), spec["task"], spec.get("classes"))


MODELS: dict[str, Callable[[dict[str, Any], tuple[int, ...], int], nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "resnet": _build_resnet,
    "multiexit": build_multiexit,  # ResNet with early exits (self-distillation)
    "multitask": build_multitask,  # shared trunk + named task heads (multi-task)
    "fcn": build_fcn,  # fully-convolutional encoder-decoder: segmentation / detection heads
    "preprocessed": build_preprocessed,  # any of these with its data's standardisation (export)
    "factory": _build_factory,  # the user's own nn.Module: spec {"factory": "module:function"}
    "hf": build_hf,  # a transformers image classifier folder (config.json + model.safetensors)
    "onnx": _build_onnx,  # frozen teachers from other frameworks, in the user's units
    "sklearn": _build_sklearn,
}
FROZEN = ("onnx", "sklearn")
"""Kinds that run a file from another framework: no weights of ours, never trained."""
"""Every architecture a recipe's `kind` may name."""


MAX_PARAMETERS = 2**31
"""The most parameters a built-in family may have (8 GiB of float32): a bigger spec is a typo,
refused before any memory is allocated."""
BUILT_IN = ("mlp", "cnn", "resnet", "multiexit", "multitask", "fcn")
"""Families built here from plain numbers: sized on the meta device before the real build."""
MAX_INPUT_VALUES = 2**28
MAX_OUTPUTS = 1 << 20


def check_shapes(input_shape: Any, num_outputs: Any, where: str = "model") -> None:
    """One line unless `input_shape` is a short list of positive ints of bounded size and
    `num_outputs` a positive int."""
    if (
        not isinstance(input_shape, list | tuple)
        or not 1 <= len(input_shape) <= 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
        or math.prod(input_shape) > MAX_INPUT_VALUES
    ):
        raise StillroomError(
            f"{where}: input_shape must be 1 to 8 positive sizes with at most {MAX_INPUT_VALUES:,} "
            f"values per sample, got {str(input_shape)[:80]}"
        )
    if not (isinstance(num_outputs, int) and not isinstance(num_outputs, bool)) or not (
        1 <= num_outputs <= MAX_OUTPUTS
    ):
        raise StillroomError(
            f"{where}: num_outputs must be a whole number from 1 to {MAX_OUTPUTS:,}, got "
            f"{str(num_outputs)[:80]!r}"
        )


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Build the architecture `spec["kind"]` for inputs of `input_shape` and `num_outputs` outputs.

    A built-in family is first built on the meta device (no memory): a spec that does not fit
    the data (a cnn on flat features), or that would not fit in memory, fails in one line."""
    if not isinstance(spec, dict):
        raise StillroomError(f"a model spec is a mapping with a kind, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in MODELS:
        raise StillroomError(
            f"unknown model kind {str(kind)[:80]!r}; available: {', '.join(MODELS)}"
        )
    if kind in BUILT_IN:
        with torch.device("meta"):
            try:
                sized = MODELS[kind](spec, tuple(input_shape), num_outputs)
            except StillroomError:
                raise
            except (ValueError, TypeError, KeyError, RuntimeError) as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise StillroomError(
                    f"model kind {kind} cannot be built for input shape {tuple(input_shape)} "
                    f"with {num_outputs} outputs: {first}"
                ) from None
        parameters = sum(p.numel() for p in sized.parameters())
        if parameters > MAX_PARAMETERS:
            raise StillroomError(
                f"model kind {kind} with this spec has {parameters:,} parameters (more than "
                f"{MAX_PARAMETERS:,}, {MAX_PARAMETERS * 4 // 2**30} GiB as float32); use "
                "narrower layers"
            )
    try:
        return MODELS[kind](spec, tuple(input_shape), num_outputs)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        # a spec from a model.json: a missing or mistyped key is the file's fault, one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StillroomError(
            f"model spec of kind {kind} cannot be built ({type(err).__name__}: {first}); check "
            "model.json, or save the model again"
        ) from None


def device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors live; the CPU for one with none (a model from another framework
    runs its own runtime on the CPU)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters, those of a model from another framework included (the
    weights of an ONNX graph, the nodes of a tree ensemble: see stillroom.models.external)."""
    frozen = sum(
        m.parameter_count for m in model.modules() if isinstance(m, OnnxModule | SklearnModule)
    )
    return frozen + sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, path: Path) -> None:
    """state_dict -> safetensors, atomically. Tensors are made contiguous copies on the CPU."""
    atomic_save_tensors(model.state_dict(), Path(path))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into `model`, with a fix-it message when they do not fit."""
    path = Path(path)
    if not path.is_file():
        raise StillroomError(f"weights file {path} does not exist; check the path")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise StillroomError(
            f"cannot read {path} as safetensors ({err}); is the file complete?"
        ) from err
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise StillroomError(
            f"weights in {path} do not fit this architecture (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); check the model spec matches the one saved"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise StillroomError(f"weights in {path} do not fit this architecture: {first}") from err
    return model


def save_model(model: nn.Module, spec: dict[str, Any], directory: Path, **meta: Any) -> Path:
    """Write `model.safetensors` and `model.json` (spec, input shape, outputs) into `directory`.
    An hf model's spec keeps its transformers config, not the folder it came from."""
    directory = Path(directory)
    if spec.get("kind") == "hf":
        spec = saved_spec(model, spec)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / "model.safetensors")
    atomic_write_text(directory / "model.json", json.dumps({"spec": spec, **meta}, indent=2))
    return directory / "model.safetensors"


def in_user_units(model: nn.Module, meta: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(model, model.json) wrapped with the standardisation of its data, when it had one: the
    wrapped model takes and gives the user's units, and its spec rebuilds it that way."""
    preprocess = meta.get("preprocess")
    if not preprocess:
        return model, meta
    spec = {"kind": "preprocessed", "model": meta["spec"], "preprocess": preprocess}
    return Preprocessed(model, preprocess), {**meta, "spec": spec, "preprocess": None}


MAX_MODEL_JSON = 16 * 2**20


def read_model_json(directory: Path) -> dict[str, Any]:
    """A model folder's model.json, checked for the shape `load_model` needs (a mapping with a
    spec of a known kind, input_shape, num_outputs) before anything is built from it."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not directory.exists():
        raise StillroomError(f"model folder {directory} does not exist; check the path")
    if not directory.is_dir():
        raise StillroomError(f"{directory} is a file, not a model folder (model.json + weights)")
    if not meta_path.is_file():
        raise StillroomError(
            f"{directory} holds no model.json; point at a folder written by stillroom"
        )
    if meta_path.stat().st_size > MAX_MODEL_JSON:
        raise StillroomError(f"{meta_path} is {meta_path.stat().st_size:,} bytes: not a model.json")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StillroomError(
            f"{meta_path} is not valid JSON ({str(err)[:120]}); the model folder is damaged"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
        raise StillroomError(
            f"{meta_path} must be a mapping with a 'spec' mapping (written by stillroom's "
            "save_model); the model folder is damaged"
        )
    kind = meta["spec"].get("kind")
    if not isinstance(kind, str) or kind not in MODELS:
        raise StillroomError(
            f"{meta_path}: spec.kind {str(kind)[:80]!r} is not a model kind; available: "
            f"{', '.join(MODELS)}"
        )
    check_shapes(meta.get("input_shape"), meta.get("num_outputs"), str(meta_path))
    if meta.get("preprocess") is not None and not isinstance(meta["preprocess"], dict):
        raise StillroomError(f"{meta_path}: preprocess must be a mapping or null")
    return meta


def load_model(directory: Path, user_units: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model`; returns (module, metadata). The module works in
    the standardised units it was trained in, or (user_units) in the units of the user's data."""
    directory = Path(directory)
    meta = read_model_json(directory)
    model = build_model(meta["spec"], tuple(meta["input_shape"]), meta["num_outputs"])
    load_weights(model, directory / "model.safetensors")
    if meta["spec"]["kind"] in FROZEN:  # another framework's model works in the user's units
        preprocess = meta.get("preprocess")
        return (
            (model, meta)
            if user_units or not preprocess
            else (Standardized(model, preprocess), meta)
        )
    return in_user_units(model, meta) if user_units else (model, meta)


__all__ = [
    "MLP",
    "MODELS",
    "Preprocessed",
    "ResNet",
    "SmallCNN",
    "Standardized",
    "build_model",
    "count_parameters",
    "device_of",
    "in_user_units",
    "load_model",
    "load_weights",
    "save_model",
    "save_weights",
]
