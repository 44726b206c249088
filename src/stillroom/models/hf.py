"""`kind: hf`: a Hugging Face transformers image classifier from a local folder, as an nn.Module
that maps (N, C, H, W) images to (N, num_outputs) logits like every other model of the table.

The folder is what `model.save_pretrained(folder)` writes: config.json, and model.safetensors
when it has weights (without them the model is built from config.json alone, freshly
initialised). It loads offline, from safetensors only, never with trust_remote_code (see
`stillroom.llm.hub`). Any architecture `AutoModelForImageClassification` knows fits: ViT,
ConvNeXt, ResNet, Swin, ...

`new_head: true` replaces the folder's classification head by a fresh one with the data's
number of classes (transformers' `num_labels=..., ignore_mismatched_sizes=True`): the usual way
to train a pretrained backbone on one's own labels. When the folder holds the image processor's
`preprocessor_config.json`, its pixel settings travel with the model: images (stillroom's [0, 1]
pixels) are resized to the processor's size and normalised with its mean and std inside the
forward, so training, the store, evaluation and every export see what the model was made for.

A model folder stillroom writes for it carries the transformers config (and those pixel
settings) inside model.json's spec ({"kind": "hf", "config": {...}, "pixels": {...}}), so
`load_model` rebuilds it without the original folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import StillroomError


class HFImageClassifier(nn.Module):
    """forward(x: (N, C, H, W) float) -> (N, num_labels) logits of a transformers image classifier
    (`model(pixel_values=x).logits`): one tensor, so the loop, store and export take it as is.

    pixels: the image processor's settings ({"size": [H, W] | None, "mean": [...] | None,
    "std": [...] | None}), applied to x first: resized (bilinear), then (x - mean) / std."""

    def __init__(self, model: nn.Module, source: str, pixels: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model, self.source, self.pixels = model, source, pixels or {}
        mean, std = self.pixels.get("mean"), self.pixels.get("std")
        # buffers, not parameters: they move with the model and are in its safetensors
        if mean is not None and std is not None:
            self.register_buffer("pixel_mean", torch.tensor(mean).reshape(1, -1, 1, 1))
            self.register_buffer("pixel_std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.pixels.get("size")
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if "mean" in self.pixels and self.pixels["mean"] is not None:
            x = (x - self.pixel_mean) / self.pixel_std
        return self.model(pixel_values=x).logits

    def config_dict(self) -> dict[str, Any]:
        """The transformers config as JSON-able data: what rebuilds the architecture."""
        return self.model.config.to_dict()

    def check_fits(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        """One line saying what does not fit the data (labels, channels, image size), if any."""
        config = self.model.config
        where = f"the hf model {self.source}"
        if config.num_labels != num_outputs:
            raise StillroomError(
                f"{where} has num_labels {config.num_labels} (config.json) but the data has "
                f"{num_outputs} outputs; set new_head: true in its section for a fresh head of "
                f"{num_outputs} classes, or use a folder whose head has {num_outputs} labels"
            )
        if len(input_shape) != 3:
            raise StillroomError(
                f"{where} is an image classifier and takes (channels, height, width) images, but "
                f"the data's inputs have shape {tuple(input_shape)}; use image data "
                "(data.source images, digits, ...) or another model kind"
            )
        channels = getattr(config, "num_channels", input_shape[0])
        if channels != input_shape[0]:
            mode = {1: " or data.image_mode=L", 3: " or data.image_mode=RGB"}.get(channels, "")
            raise StillroomError(
                f"{where} takes images with {channels} channel(s) (config.json num_channels) but "
                f"the data's have {input_shape[0]}; use a folder made for {input_shape[0]} "
                f"channel(s){mode} (image folders)"
            )
        # the forward decides: ViT needs its exact image_size, ConvNeXt/ResNet adapt to most sizes
        was_training = self.training
        try:
            with torch.random.fork_rng(), torch.no_grad():
                out = self.eval()(torch.zeros((1, *input_shape)))
        except (ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            size = getattr(config, "image_size", None)
            hint = (
                f"its config.json has image_size {size}: set data.image_size=[{size}, {size}] for "
                "an image folder, or use a folder made for your images"
                if isinstance(size, int) and (size, size) != tuple(input_shape[1:])
                else "use a folder whose model takes these images"
            )
            raise StillroomError(
                f"{where} cannot take the data's images of shape {tuple(input_shape)} ({first}); "
                f"{hint}"
            ) from None
        finally:
            self.train(was_training)
        assert out.shape == (1, num_outputs), out.shape


def _transformers() -> Any:
    from stillroom.llm.hub import transformers_module

    return transformers_module()


def _from_folder(folder: Path, num_labels: int | None = None) -> nn.Module:
    """The folder's image classifier: its weights when it has safetensors, else a fresh one.
    num_labels: a fresh head of that many classes in place of the folder's."""
    from stillroom.llm.hub import resolve_model_dir

    transformers = _transformers()
    if not folder.is_dir():
        raise StillroomError(
            f"hf model folder {folder} does not exist; point path at a folder save_pretrained wrote"
        )
    if not (folder / "config.json").is_file():
        raise StillroomError(f"hf model folder {folder} has no config.json")
    auto = transformers.AutoModelForImageClassification
    logging = transformers.utils.logging
    shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()  # a "Loading weights" bar for a file read in a blink is noise
    head = {} if num_labels is None else {"num_labels": num_labels}
    if head:
        # "newly initialized: classifier.weight" is what was asked for: not a warning here
        logging.set_verbosity_error()
    try:
        if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
            resolve_model_dir(folder)  # refuses pickled weights, with how to convert them
            return auto.from_pretrained(
                folder,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
                **head,
                **({"ignore_mismatched_sizes": True} if head else {}),
            )
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, **head
        )
        return auto.from_config(config, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(
            f"cannot load an image classifier (AutoModelForImageClassification) from {folder}: "
            f"{first}"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
        if shown:
            logging.enable_progress_bar()


def _pixels(folder: Path) -> dict[str, Any] | None:
    """The pixel settings of the folder's image processor (preprocessor_config.json), if any:
    {"size": [H, W] | None, "mean": [...] | None, "std": [...] | None}. Only the numbers are
    read; no processor class is built."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StillroomError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(config, dict):
        raise StillroomError(f"{path} must hold a JSON object; fix or remove it")
    size = config.get("size") if config.get("do_resize", True) else None
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        size = [int(size["height"]), int(size["width"])]
    elif isinstance(size, int):
        size = [size, size]
    else:
        size = None  # shortest_edge / crop schemes: the data's image_size decides
    mean, std = config.get("image_mean"), config.get("image_std")
    if not config.get("do_normalize", True) or mean is None or std is None:
        mean = std = None
    elif not (
        isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and all(std)
    ):
        raise StillroomError(
            f"{path}: image_mean and image_std must be lists of one number per channel"
        )
    return {"size": size, "mean": mean, "std": std}


def _from_config(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised image classifier of a saved config (its weights are loaded after)."""
    transformers = _transformers()
    values = dict(config)
    model_type = values.pop("model_type", None)
    try:
        built = transformers.AutoConfig.for_model(model_type, **values)
        return transformers.AutoModelForImageClassification.from_config(
            built, trust_remote_code=False, dtype=torch.float32
        )
    except (ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(
            f"cannot rebuild the hf model of model_type {model_type!r} from model.json: {first}"
        ) from None


def build_hf(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """spec {"kind": "hf", "path": FOLDER} (a recipe's) or {"kind": "hf", "config": {...}} (a
    model.json's: the architecture alone, the weights are in the folder beside it)."""
    if "config" in spec:
        source = spec.get("source", "model.json")
        model = HFImageClassifier(_from_config(spec["config"]), source, spec.get("pixels"))
    else:
        folder = Path(spec["path"])
        labels = num_outputs if spec.get("new_head") else None
        model = HFImageClassifier(_from_folder(folder, labels), str(folder), _pixels(folder))
    model.check_fits(tuple(input_shape), num_outputs)
    return model


def saved_spec(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec model.json keeps for an hf model: its config, so no other folder is needed."""
    assert isinstance(model, HFImageClassifier), type(model)
    source = spec.get("source", spec.get("path"))
    saved = {"kind": "hf", "config": model.config_dict(), "source": source}
    return {**saved, "pixels": model.pixels} if model.pixels else saved
