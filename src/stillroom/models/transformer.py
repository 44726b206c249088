"""A tiny transformer encoder classifier over token ids, for export and parity tests.

Plain torch (no transformers dependency): token + learned position embeddings ->
nn.TransformerEncoder -> mean over the non-padding positions -> linear head.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """Encoder classifier: (N, L) int64 token ids -> (N, num_outputs) logits.

    Args:
        vocab_size: number of token ids; `pad_id` marks padding and is left out of the mean.
        num_outputs: number of classes (or regression outputs).
        max_len: longest sequence the position embedding covers.
        d_model: width of the embeddings and of every encoder layer.
        heads: attention heads per layer (must divide d_model).
        layers: encoder layers.
        ff: width of each layer's feed-forward block.
        dropout: dropout inside the encoder layers.
        pad_id: the padding token id.
    """

    def __init__(
        self,
        vocab_size: int,
        num_outputs: int,
        max_len: int = 64,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 2,
        ff: int = 64,
        dropout: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be divisible by heads {heads}")
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff, dropout=dropout, batch_first=True
        )
        # nested tensors are an inference-only fast path whose output layout depends on the mask;
        # plain tensors keep eager, torch.export and ONNX on the same arithmetic
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (N, L) int64 -> hidden (N, L, d_model) -> pooled (N, d_model) -> (N, outputs)
        keep = tokens != self.pad_id  # (N, L) True on real tokens
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.tokens(tokens) + self.positions(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        # clamp: an all-padding row pools to zeros instead of dividing by zero
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)
