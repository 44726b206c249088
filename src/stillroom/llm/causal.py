"""Causal language models as the loop sees them, students built from a teacher's config, sampling.

    CausalLM(hf_model, vocab_size)      forward(inputs) -> (N, L, V) next-token logits
    student_config(teacher.config, layers=4, hidden=256, heads=4)   a smaller Llama, same vocabulary
    init_from_teacher(student, teacher)  embeddings, final norm, head and every k-th layer copied
    sample_continuations(...)            the student's own continuations (on-policy distillation)
    heldout_metrics({...}, loader)       perplexity, token accuracy, top-1 agreement, tokens/s

Logits are aligned with next-token labels: position t scores token t + 1, so the corpus gives
labels[t] = input_ids[t + 1] (`stillroom.llm.corpus`) and the loop's (N, L, V) vs (N, L) terms need
no shift. `vocab_size` slices the logits to the ids both models share (`stillroom.llm.vocab`): an
embedding matrix padded to a rounder size has rows no token ever maps to.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from stillroom.errors import StillroomError
from stillroom.llm.hub import transformers_module
from stillroom.losses import IGNORE_INDEX
from stillroom.objective import to_device
from stillroom.store import StoreTeacher
from stillroom.store.reader import SoftTargetStore


class CausalLM(nn.Module):
    """A Hugging Face causal LM with stillroom's call convention.

    forward(inputs) takes a dict with "input_ids" (N, L) and optionally "attention_mask" (N, L)
    (other keys are ignored), or a bare (N, L) id tensor (every token attended: what a store's
    `cache_teacher` passes), and returns (N, L, vocab_size) logits, position t predicting token t+1.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        rows = model.get_output_embeddings().weight.shape[0]
        self.vocab_size = rows if vocab_size is None else vocab_size
        if not 1 <= self.vocab_size <= rows:
            raise StillroomError(
                f"vocab_size {self.vocab_size} must be in [1, {rows}] (the model's output rows)"
            )

    @property
    def max_positions(self) -> int:
        return max_positions(self.model)

    def forward(self, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            ids, mask = inputs, None
        else:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # rows past the shared vocabulary (padding rows) never enter a softmax
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model was built for (config.max_position_embeddings)."""
    value = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(value, int):
        raise StillroomError(
            f"{type(model).__name__}'s config has no max_position_embeddings; "
            "cannot check the sequence length against it"
        )
    return value


def llama_config(
    vocab_size: int,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 2048,
    tie_embeddings: bool = True,
    rope_theta: float = 10_000.0,
    rms_norm_eps: float = 1e-5,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """A `LlamaConfig` from the sizes that matter; head_dim = hidden / heads.

    intermediate defaults to 8/3 * hidden rounded up to a multiple of 8 (Llama's SwiGLU ratio);
    kv_heads to heads (plain multi-head attention; fewer is grouped-query attention).
    """
    kv_heads = heads if kv_heads is None else kv_heads
    problems = [
        (layers >= 1, f"layers must be >= 1, got {layers}"),
        (hidden >= 1 and heads >= 1, f"hidden and heads must be >= 1, got {hidden}, {heads}"),
        (hidden % heads == 0, f"hidden {hidden} must be a multiple of heads {heads}"),
        (
            kv_heads >= 1 and heads % kv_heads == 0,
            f"heads {heads} must be a multiple of kv_heads {kv_heads}",
        ),
    ]
    for ok, message in problems:
        if not ok:
            raise StillroomError(f"student/teacher config: {message}")
    if intermediate is None:
        intermediate = -(-(8 * hidden) // 3 // 8) * 8
    return transformers_module().LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=rms_norm_eps,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def student_config(
    teacher_config: Any,
    *,
    layers: int,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int | None = None,
) -> Any:
    """A Llama config for a smaller student of `teacher_config`: the teacher's vocabulary rows,
    special ids, RoPE base, norm epsilon and embedding tying; fewer layers and/or narrower. Sizes
    left None are the teacher's (intermediate: the teacher's when hidden is too, else 8/3 hidden)."""
    same_width = hidden is None or hidden == teacher_config.hidden_size
    hidden = teacher_config.hidden_size if hidden is None else hidden
    heads = heads or (teacher_config.num_attention_heads if same_width else max(1, hidden // 64))
    if kv_heads is None and same_width and heads == teacher_config.num_attention_heads:
        kv_heads = getattr(teacher_config, "num_key_value_heads", None)
    if intermediate is None and same_width:
        intermediate = teacher_config.intermediate_size
    rope = getattr(teacher_config, "rope_parameters", None) or {}
    return llama_config(
        teacher_config.vocab_size,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_positions=max_positions or teacher_config.max_position_embeddings,
        tie_embeddings=bool(getattr(teacher_config, "tie_word_embeddings", True)),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rms_norm_eps=float(getattr(teacher_config, "rms_norm_eps", 1e-5)),
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
    )


def build_causal_lm(config: Any, seed: int) -> nn.Module:
    """A freshly initialised LlamaForCausalLM; the seed alone decides its weights."""
    torch.manual_seed(seed)
    return transformers_module().LlamaForCausalLM(config)


def evenly_spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Every (N / n)-th teacher layer from the first: 12 -> 6 gives 0, 2, 4, 6, 8, 10 (DistilBERT's
    every other layer, Sanh et al. 2019, arXiv:1910.01108)."""
    if not 1 <= student_layers <= teacher_layers:
        raise StillroomError(
            f"a student initialised from teacher layers needs 1..{teacher_layers} layers, "
            f"got {student_layers}"
        )
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def check_init_widths(student_cfg: Any, teacher_cfg: Any, init: str) -> None:
    """Refuse `init="teacher"` for a student whose widths differ from the teacher's: its layers'
    weights would not fit (checked from the configs, before any weights exist)."""
    if init != "teacher":
        return
    widths = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    differ = [k for k in widths if getattr(student_cfg, k, None) != getattr(teacher_cfg, k, None)]
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        differ.append("vocab_size")
    if differ:
        shown = ", ".join(
            f"{k} {getattr(student_cfg, k, None)} vs {getattr(teacher_cfg, k, None)}"
            for k in differ
        )
        raise StillroomError(
            f"a student initialised from teacher layers needs the teacher's widths ({shown}); "
            "leave hidden/heads/intermediate unset, or use student.init=random"
        )
    if student_cfg.num_hidden_layers > teacher_cfg.num_hidden_layers:
        raise StillroomError(
            f"a student initialised from teacher layers has at most the teacher's "
            f"{teacher_cfg.num_hidden_layers} layers, got {student_cfg.num_hidden_layers}"
        )


def init_from_teacher(
    student: nn.Module, teacher: nn.Module, layers: list[int] | None = None
) -> list[int]:
    """Copy the teacher's embeddings, final norm, LM head and `layers` (default evenly spaced)
    into a student of the teacher's width. Returns the teacher layers used, in student order."""
    s_cfg, t_cfg = student.config, teacher.config
    check_init_widths(s_cfg, t_cfg, "teacher")
    picked = layers or evenly_spaced_layers(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers)
    if len(picked) != s_cfg.num_hidden_layers or not all(
        0 <= i < t_cfg.num_hidden_layers for i in picked
    ):
        raise StillroomError(
            f"student.teacher_layers {picked} must list {s_cfg.num_hidden_layers} indices in "
            f"0..{t_cfg.num_hidden_layers - 1}"
        )
    source = teacher.state_dict()
    copied = {}
    for key in student.state_dict():
        teacher_key = key
        if key.startswith("model.layers."):
            index, rest = key.removeprefix("model.layers.").split(".", 1)
            teacher_key = f"model.layers.{picked[int(index)]}.{rest}"
        copied[key] = source[teacher_key].detach().clone().float()
    student.load_state_dict(copied)
    return list(picked)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters (tied weights once) and those outside the token embeddings and LM head."""
    total = sum(p.numel() for p in model.parameters())
    vocab = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    embedding = sum(p.numel() for p in model.parameters() if id(p) in vocab)
    return {"parameters": total, "non_embedding_parameters": total - embedding}


def save_causal_lm(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Hugging Face folder: config.json, model.safetensors, generation_config, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    logging = transformers_module().utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # one small file: a "Writing model shards" bar is noise
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if shown:
            logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


class TokenStoreTeacher:
    """A soft-target store of a causal LM as the teacher of token batches.

    The store is written with `cache_teacher(CausalLM(teacher), train.input_ids, out, top_k=k,
    class_dim=-1)`: its inputs are the (N, L) token blocks, so its dataset fingerprint hashes the
    token ids and every batch is checked against the per-block fingerprints (a block that was
    rewritten, e.g. by on-policy sampling, is refused rather than scored with stale targets).
    Right padding leaves the stored logits of the real tokens exact: attention is causal.
    """

    def __init__(
        self,
        store: SoftTargetStore | Path | str,
        *,
        teacher: nn.Module | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> None:
        # every batch compared: a block may be rewritten after its first read
        self.inner = StoreTeacher(store, teacher=teacher, data=input_ids, recheck=True)

    def to(self, device: torch.device | str) -> TokenStoreTeacher:
        return self

    def __call__(self, inputs: dict[str, torch.Tensor] | torch.Tensor, index: Any) -> Any:
        ids = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
        return self.inner(ids, index)


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Sample continuations of equal-length prompts, token by token with the KV cache.

    Args:
        model: a Hugging Face causal LM (called with input_ids, past_key_values, use_cache).
        prompt: (B, P) token ids, no padding (group prompts by length).
        max_new_tokens: tokens to sample per row.
        temperature: softmax temperature of the sampling distribution (> 0).
        generator: the randomness; a CPU generator works for any device (draws are moved).
        vocab_size: sample only ids below this (the vocabulary shared with the teacher).
        eos_token_id: a row stops after it; later positions hold eos again (cut by the caller).

    Returns:
        (B, n) sampled ids, n <= max_new_tokens (fewer when every row has ended).
    """
    if temperature <= 0:
        raise StillroomError(f"sampling temperature must be > 0, got {temperature}")
    # the cache is filled in place; passed as the 4th positional argument, which is
    # past_key_values in transformers 4.x and cache in 5.x (the keyword was renamed)
    cache = transformers_module().DynamicCache()
    logits = model(prompt, None, None, cache, use_cache=True).logits[:, -1]
    finished = torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
    draw_on = generator.device if generator is not None else torch.device("cpu")
    sampled = []
    for _ in range(max_new_tokens):
        logits = logits[:, :vocab_size] if vocab_size is not None else logits
        probs = F.softmax(logits.float() / temperature, dim=-1)
        # drawn on the generator's device: a CPU generator replays the same tokens on any device
        token = torch.multinomial(probs.to(draw_on), 1, generator=generator).squeeze(1)
        token = token.to(prompt.device)
        if eos_token_id is not None:
            token = torch.where(finished, eos_token_id, token)
            finished |= token == eos_token_id
        sampled.append(token)
        if bool(finished.all()):
            break
        logits = model(token[:, None], None, None, cache, use_cache=True).logits[:, -1]
    if not sampled:
        return prompt.new_zeros((len(prompt), 0))
    return torch.stack(sampled, dim=1)


@torch.no_grad()
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def heldout_metrics(
    models: dict[str, nn.Module], loader: DataLoader, reference: str | None = None
) -> dict[str, dict[str, float]]:
    """Held-out next-token metrics of each model, in one pass over `loader`.

    Per model: perplexity = exp(mean NLL over labelled tokens), loss (that mean, nats/token),
    token_accuracy (top-1 = label), tokens_per_second (forward passes alone, attended tokens),
    and, for every model but `reference`, teacher_agreement: the share of labelled positions where
    its top-1 next token equals the reference model's.
    """
    device = next(next(iter(models.values())).parameters()).device
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in models}  # nll, hits, agree, secs
    tokens = attended = 0
    warmed = False
    for module in models.values():
        module.to(device).eval()
    for inputs, labels, _ in loader:
        inputs, labels = to_device(inputs, device), labels.to(device)
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        attended += int(mask.sum()) if mask is not None else labels.numel()
        tokens += int(valid.sum())
        top1 = {}
        for name, module in models.items():
            if not warmed:  # the first call pays one-off allocation costs: keep them off the clock
                module(inputs)
            _synchronize(device)  # accelerators run asynchronously: time finished work only
            started = time.perf_counter()
            logits = module(inputs).float()
            _synchronize(device)
            sums[name][3] += time.perf_counter() - started
            nll = F.cross_entropy(logits.movedim(-1, 1), safe, reduction="none")
            top1[name] = logits.argmax(-1)
            sums[name][0] += float(nll[valid].sum())
            sums[name][1] += float((top1[name] == labels)[valid].sum())
        warmed = True
        if reference is not None:
            for name in models:
                sums[name][2] += float((top1[name] == top1[reference])[valid].sum())
    if tokens == 0:
        raise StillroomError("the held-out split has no labelled tokens to evaluate on")
    rows = {}
    for name, (nll, hits, agree, seconds) in ((n, s.tolist()) for n, s in sums.items()):
        row = {
            "perplexity": float(torch.tensor(nll / tokens).clamp(max=50.0).exp()),
            "loss": nll / tokens,
            "token_accuracy": hits / tokens,
            "tokens_per_second": attended / max(seconds, 1e-9),
            "heldout_tokens": tokens,
        }
        if reference is not None and name != reference:
            row["teacher_agreement"] = agree / tokens
        rows[name] = row
    return rows
