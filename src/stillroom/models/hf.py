"""`kind: hf`: a Hugging Face transformers image classifier from a local folder, as an nn.Module
that maps (N, C, H, W) images to (N, num_outputs) logits like every other model of the table.

The folder is what `model.save_pretrained(folder)` writes: config.json, and model.safetensors
when it has weights (without them the model is built from config.json alone, freshly
initialised). It loads offline, from safetensors only, never with trust_remote_code (see
`stillroom.llm.hub`). Any architecture `AutoModelForImageClassification` knows fits: ViT,
ConvNeXt, ResNet, Swin, ...

A model folder stillroom writes for it carries the transformers config inside model.json's spec
({"kind": "hf", "config": {...}}), so `load_model` rebuilds it without the original folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError


class HFImageClassifier(nn.Module):
    """forward(x: (N, C, H, W) float) -> (N, num_labels) logits of a transformers image classifier
    (`model(pixel_values=x).logits`): one tensor, so the loop, store and export take it as is."""

    def __init__(self, model: nn.Module, source: str) -> None:
        super().__init__()
        self.model, self.source = model, source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
                f"{num_outputs} outputs; use a folder whose head has {num_outputs} labels (load it "
                f"with num_labels={num_outputs}, ignore_mismatched_sizes=True and save_pretrained)"
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


def _from_folder(folder: Path) -> nn.Module:
    """The folder's image classifier: its weights when it has safetensors, else a fresh one."""
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
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a "Loading weights" bar for a file read in a blink is noise
    try:
        if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
            resolve_model_dir(folder)  # refuses pickled weights, with how to convert them
            return auto.from_pretrained(
                folder,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
            )
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
        return auto.from_config(config, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(
            f"cannot load an image classifier (AutoModelForImageClassification) from {folder}: "
            f"{first}"
        ) from None
    finally:
        if shown:
            logging.enable_progress_bar()


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
        model = HFImageClassifier(_from_config(spec["config"]), spec.get("source", "model.json"))
    else:
        folder = Path(spec["path"])
        model = HFImageClassifier(_from_folder(folder), str(folder))
    model.check_fits(tuple(input_shape), num_outputs)
    return model


def saved_spec(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec model.json keeps for an hf model: its config, so no other folder is needed."""
    assert isinstance(model, HFImageClassifier), type(model)
    source = spec.get("source", spec.get("path"))
    return {"kind": "hf", "config": model.config_dict(), "source": source}
