"""`stillroom export <transformers folder>`: a Hugging Face student (as the causal_lm, encoder and
sentence_embedding methods save them) to ONNX beside its tokenizer, checked through onnxruntime;
bad folders and failed exports are one line. Tiny models built from configs: nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from helpers import assert_user_error, stillroom_in_process, tree_digest
from stillroom.errors import StillroomError
from stillroom.llm.causal import build_causal_lm, llama_config, save_causal_lm
from stillroom.llm.corpus import SONNETS
from stillroom.llm.hub import load_pretrained
from stillroom.llm.vocab import train_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal_lm student folder: Llama, hidden 16, 2 layers, vocab 100, with its tokenizer."""
    folder = tmp_path_factory.mktemp("causal") / "student_kd"
    config = llama_config(VOCAB, layers=2, hidden=16, heads=2, max_positions=64, eos_token_id=1)
    save_causal_lm(build_causal_lm(config, seed=0), train_tokenizer([SONNETS], VOCAB), folder)
    return folder


@pytest.fixture(scope="module")
def exported(causal_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The one end-to-end run of the feature: `stillroom export FOLDER --out OUT`."""
    before = tree_digest(causal_folder)
    out = tmp_path_factory.mktemp("exports") / "causal"
    result = stillroom_in_process("export", causal_folder, "--out", out, "--int8")
    assert result.returncode == 0, result.stderr
    assert tree_digest(causal_folder) == before  # the student folder is only read
    return out, result.stdout


def test_causal_lm_exports_to_onnx_beside_its_tokenizer(exported, causal_folder: Path) -> None:
    out, stdout = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] and list(manifest["parity"]["formats"]) == ["onnx"]
    onnx = manifest["parity"]["formats"]["onnx"]
    assert onnx["max_abs_diff"] <= onnx["allowed"] and onnx["runtime"].startswith("onnxruntime")
    assert manifest["parity"]["checked_samples"] == 8
    assert manifest["source"]["split"] == "8 random token sequences of 16"
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["model"]["attention"] == "eager"
    assert manifest["inputs"] == [
        {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
        {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
    ]
    assert manifest["outputs"] == [{"name": "logits", "shape": ["batch", "sequence", VOCAB]}]
    assert manifest["versions"]["onnx_opset"] == 18
    files = set(manifest["files"])
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "model.safetensors" not in files and not (out / "model.safetensors").exists()
    for name, info in manifest["files"].items():
        assert (out / name).stat().st_size == info["bytes"], name
    assert "8 random token sequences" in " ".join(stdout.split())


def test_the_export_folder_is_deployable(exported, causal_folder: Path) -> None:
    """Tokenizer from the export folder, ONNX through onnxruntime, on real text of a batch size
    and length never traced: the same logits as the student in transformers."""
    out, _ = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    tokenizer.pad_token = "<pad>"
    batch = tokenizer(
        ["Shall I compare thee to a summer's day?", "Thou art more lovely", "and more temperate"],
        padding=True,
        return_tensors="np",
    )
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    logits = session.run(["logits"], feeds)[0]
    model = load_pretrained(causal_folder, "causal_lm")
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
    assert logits.shape == (3, feeds["input_ids"].shape[1], VOCAB)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


def test_existing_export_needs_force_and_force_replaces_only_an_export(
    exported, causal_folder, tmp_path: Path
) -> None:
    from stillroom.export.formats import _prepare_out_dir
    from stillroom.export.transformers_folder import DEPLOY_FILES

    out, _ = exported
    result = stillroom_in_process("export", causal_folder, "--out", out)
    assert_user_error(result, "already exists; pass --force to replace it")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "notes.txt").write_text("mine")
    with pytest.raises(StillroomError, match=r"also holds notes\.txt"):
        _prepare_out_dir(copy, True, DEPLOY_FILES)
    (copy / "notes.txt").unlink()
    _prepare_out_dir(copy, True, DEPLOY_FILES)  # the export and its tokenizer files: replaced
    assert list(copy.iterdir()) == []


def test_other_formats_are_refused_for_a_transformers_folder(causal_folder, tmp_path) -> None:
    out = tmp_path / "out"
    result = stillroom_in_process("export", causal_folder, "--out", out, "--format", "torch_export")
    assert_user_error(result, "a transformers folder exports to onnx, not torch_export")
    assert not out.exists()


def test_a_transformers_student_exports_int8_too(exported) -> None:
    out, _ = exported
    report = json.loads((out / "manifest.json").read_text())["int8"]
    assert (out / "model_int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    assert report["max_abs_diff"] > 0 and 0 <= report["top1_agreement_with_fp32"] <= 1


def test_a_failed_onnx_export_is_one_line(causal_folder, tmp_path, monkeypatch) -> None:
    """Whatever the exporter raises (here a stand-in for an architecture it cannot trace), the
    user gets one line, and nothing outside --out is written."""

    def fail(*args, **kwargs):
        raise RuntimeError("Cannot export aten::unknown_op\nlong exporter trace ...")

    monkeypatch.setattr(torch.onnx, "export", fail)
    before = tree_digest(causal_folder)
    out = tmp_path / "out"
    result = stillroom_in_process("export", causal_folder, "--out", out)
    assert_user_error(
        result, "onnx export of TokenModel failed (RuntimeError: Cannot export aten::unknown_op)"
    )
    assert tree_digest(causal_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        ("notes", "is neither a stillroom run folder (config.yaml), a stillroom model folder"),
        ("config_only", "holds no weights (*.safetensors or *.gguf)"),
        ("pickled", "holds only pickled weights (pytorch_model.bin)"),
    ],
)
def test_folders_that_are_not_students_are_one_line(tmp_path: Path, make: str, fragment) -> None:
    folder = tmp_path / make
    folder.mkdir()
    if make == "notes":
        (folder / "notes.txt").write_text("not a model")
    else:
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    if make == "pickled":
        (folder / "pytorch_model.bin").write_bytes(b"a pickle stillroom never opens")
    before = tree_digest(tmp_path)
    result = stillroom_in_process("export", folder, "--out", tmp_path / "out")
    assert_user_error(result, fragment)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequence_classification", "sentence_embedding"])
def test_encoder_students_export(kind: str, tmp_path: Path) -> None:
    """The encoder method's classifier (logits (N, 3)) and a sentence-transformers folder
    (unit embeddings (N, 16)) export and match in onnxruntime."""
    from stillroom.export import export_transformers_folder
    from stillroom.llm.embedding import SentenceEncoder
    from stillroom.llm.encoder import TinyConfig, tiny_bert, train_wordpiece

    tokenizer = train_wordpiece(SONNETS.splitlines()[:200], VOCAB, 32)
    torch.manual_seed(0)
    config = TinyConfig(layers=2, hidden=16, heads=2, intermediate=32, max_positions=64)
    folder = tmp_path / kind
    if kind == "sentence_embedding":
        SentenceEncoder(tiny_bert(config, "encoder", len(tokenizer))).save(folder, tokenizer)
    else:
        model = tiny_bert(config, kind, len(tokenizer), num_labels=3)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    result = export_transformers_folder(folder, tmp_path / "out")
    manifest = result.manifest
    assert manifest["passed"] and "tokenizer.json" in manifest["files"]
    output = manifest["outputs"][0]
    expected = {"sequence_classification": ("logits", 3), "sentence_embedding": ("embeddings", 16)}
    assert (output["name"], output["shape"]) == (expected[kind][0], ["batch", expected[kind][1]])
    batch = tokenizer(["when i do count the clock", "that tells the time"], padding=True)
    feeds = {k: np.asarray(batch[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    out = session.run(None, feeds)[0]
    if kind == "sentence_embedding":
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out.shape == (2, expected[kind][1])
