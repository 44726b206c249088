"""Loading transformers models from local folders: offline, safetensors, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stillroom.errors import StillroomError
from stillroom.llm.hub import load_pretrained, package_folder, resolve_model_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    return folder


def test_loads_a_saved_model_in_eval_mode(tiny_bert: Path) -> None:
    model = load_pretrained(tiny_bert, "masked_lm")
    assert not model.training
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, 50)
    assert (tiny_bert / "model.safetensors").is_file()  # saved and read as safetensors


def test_missing_folder_and_empty_folder_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(StillroomError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(StillroomError, match="holds no weights"):
        load_pretrained(tmp_path)


def test_weights_without_config_and_unknown_kind(tiny_bert: Path, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((tiny_bert / "model.safetensors").read_bytes())
    with pytest.raises(StillroomError, match=r"no config\.json"):
        load_pretrained(tmp_path)
    with pytest.raises(StillroomError, match="model kind must be one of"):
        load_pretrained(tiny_bert, "seq2seq")


def test_gguf_files_resolve_by_folder_or_file(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    assert resolve_model_dir(tmp_path) == (tmp_path, "a.gguf")
    assert resolve_model_dir(tmp_path / "a.gguf") == (tmp_path, "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(StillroomError, match="several GGUF files"):
        resolve_model_dir(tmp_path)


def test_a_wrong_kind_for_the_weights_fails_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StillroomError, match="cannot load a causal_lm model from"):
        load_pretrained(folder, "causal_lm")


def test_package_folder_finds_without_importing() -> None:
    assert (package_folder("stillroom") / "__init__.py").is_file()
    with pytest.raises(StillroomError, match="not installed"):
        package_folder("no_such_package_here")
