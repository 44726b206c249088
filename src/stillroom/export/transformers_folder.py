"""`export_transformers_folder`: a Hugging Face student folder (config.json + model.safetensors +
tokenizer files, as the encoder, sentence_embedding and causal_lm methods save their students),
exported to ONNX and checked through onnxruntime on seeded random token ids.

The ONNX file takes `input_ids` and `attention_mask`, (batch, sequence) int64, both dims dynamic,
and gives one output: `logits` for a model with a head (causal LM, masked LM, sequence
classification), `last_hidden_state` for a bare encoder, `embeddings` (unit vectors) for a
sentence-transformers folder. The folder's tokenizer files and config.json are copied beside it,
so the export folder is what a deployment needs. Models load offline, from safetensors only, and
never with trust_remote_code (see `stillroom.llm.hub`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.export.formats import (
    TOLERANCE,
    ExportResult,
    Signature,
    Tolerance,
    check_formats,
    export_model,
)

TRANSFORMERS_FORMATS = ("onnx",)
"""FORMATS rows a transformers folder exports to: its safetensors weights are the folder itself."""

DEPLOY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
"""Copied beside the ONNX file when the folder has them: the tokenizer and the model's config."""

HEADS = {
    "ForCausalLM": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "sequence_classification",
}
"""config.json's architecture suffix -> the `stillroom.llm.hub.load_pretrained` kind; any other
architecture loads as a bare encoder ("encoder") and exports its last hidden state."""

PER_SEQUENCE = ("sequence_classification", "sentence_embedding")
"""Kinds whose output is (batch, features); the others give (batch, sequence, features)."""

CHECK_SEQUENCES, CHECK_LENGTH, TRACE_LENGTH = 8, 16, 8
"""Parity runs on CHECK_SEQUENCES seeded random sequences of CHECK_LENGTH tokens (some padded);
the model is traced on 2 sequences of TRACE_LENGTH, so both dims are checked at unseen sizes."""


def is_transformers_folder(folder: Path) -> bool:
    """A folder transformers saved (config.json), not a stillroom model folder (model.json)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "model.json").is_file()


class TokenModel(nn.Module):
    """forward(input_ids: (N, L) int64, attention_mask: (N, L) int64) -> one tensor: `output`
    ("logits", "last_hidden_state") of a transformers model, or (N, D) sentence embeddings
    ("embeddings", a `SentenceEncoder`)."""

    def __init__(self, model: nn.Module, output: str, causal: bool = False) -> None:
        super().__init__()
        self.model, self.output, self.causal = model, output, causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.output == "embeddings":
            return self.model({"input_ids": input_ids, "attention_mask": attention_mask})
        # no key/value cache: the deployed graph scores whole sequences and returns one tensor
        extra = {"use_cache": False} if self.causal else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return getattr(out, self.output)


def load_token_model(folder: Path) -> tuple[TokenModel, dict[str, Any]]:
    """(the folder's model as a TokenModel in eval mode, facts for the manifest)."""
    from stillroom.llm.hub import transformers_module

    logging = transformers_module().utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a "Loading weights" bar for a file read in a blink is noise
    try:
        return _load_token_model(folder)
    finally:
        if shown:
            logging.enable_progress_bar()


def _load_token_model(folder: Path) -> tuple[TokenModel, dict[str, Any]]:
    from stillroom.llm.embedding import load_sentence_encoder
    from stillroom.llm.hub import load_pretrained

    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise StillroomError(f"{folder / 'config.json'} is not valid JSON ({err})") from None
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    if (folder / "modules.json").is_file():  # a sentence-transformers folder
        encoder = load_sentence_encoder(folder)
        inner, kind, output = encoder.model, "sentence_embedding", "embeddings"
        model = TokenModel(encoder, output)
    else:
        kind = next((k for suffix, k in HEADS.items() if architecture.endswith(suffix)), "encoder")
        inner = load_pretrained(folder, kind)
        output = "last_hidden_state" if kind == "encoder" else "logits"
        model = TokenModel(inner, output, causal=kind == "causal_lm")
    # eager attention: plain MatMul/Softmax that torch.onnx traces for every architecture; the
    # fused sdpa path does not export for all of them, and computes the same numbers
    inner.set_attn_implementation("eager")
    info = {
        "architecture": architecture,
        "kind": kind,
        "attention": "eager",
        "vocab_size": int(inner.config.vocab_size),
        "max_positions": int(getattr(inner.config, "max_position_embeddings", CHECK_LENGTH)),
    }
    return model.eval(), info


def random_tokens(
    count: int, length: int, vocab_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), (count, length) int64: seeded uniform ids, and sequence i
    right-padded by i % 4 positions (never below one real token), as a tokenizer pads a batch."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (count, length), generator=generator)
    mask = torch.ones(count, length, dtype=torch.long)
    for i in range(count):
        pad = min(i % 4, length - 1)
        if pad:
            mask[i, length - pad :] = 0
    return ids, mask


def export_transformers_folder(
    folder: Path,
    out_dir: Path | None = None,
    formats: tuple[str, ...] | list[str] = TRANSFORMERS_FORMATS,
    int8: bool = False,
    force: bool = False,
    tolerance: Tolerance = TOLERANCE,
) -> ExportResult:
    """Export a transformers folder (a student of the encoder, sentence_embedding or causal_lm
    methods) to ONNX in `out_dir` (default `folder/export`), with its tokenizer files beside it.
    Parity: onnxruntime against eager PyTorch on seeded random token ids (the manifest says so).
    int8: also model_int8.onnx (onnxruntime dynamic quantisation), with its largest difference
    and its agreement with float32 (class, or next token) on those ids."""
    folder = Path(folder)
    unsupported = [name for name in check_formats(formats) if name not in TRANSFORMERS_FORMATS]
    if unsupported:
        raise StillroomError(
            f"a transformers folder exports to {', '.join(TRANSFORMERS_FORMATS)}, not "
            f"{', '.join(unsupported)}: its weights are already safetensors (the folder itself)"
        )
    model, info = load_token_model(folder)
    length = min(CHECK_LENGTH, info["max_positions"])
    check = random_tokens(CHECK_SEQUENCES, length, info["vocab_size"])
    example = random_tokens(2, min(TRACE_LENGTH, length), info["vocab_size"], seed=1)
    sequence = {0: "batch", 1: "sequence"}
    signature = Signature(
        names=("input_ids", "attention_mask"),
        dynamic=(sequence, sequence),
        output=model.output,
        # one vector per sequence (a class's logits, an embedding), or one per token
        output_axes={0: "batch"} if info["kind"] in PER_SEQUENCE else sequence,
    )
    extra = {name: folder / name for name in DEPLOY_FILES if (folder / name).is_file()}
    return export_model(
        model,
        example,
        Path(out_dir) if out_dir is not None else folder / "export",
        check_inputs=check,
        formats=formats,
        int8=int8,
        # int8 agreement: of the class for a classifier, of the next token for a language model
        task={"sequence_classification": "classification", "causal_lm": "tokens"}.get(
            info["kind"], ""
        ),
        force=force,
        tolerance=tolerance,
        source={
            "model_dir": str(folder.resolve()),
            "split": f"{CHECK_SEQUENCES} random token sequences of {length}",
        },
        signature=signature,
        model_info=info,
        extra_files=extra,
    )
