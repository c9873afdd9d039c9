"""The initial state of an SVFlow language model: token (and position) embeddings."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenEmbedding"]


class TokenEmbedding(nn.Module):
    """The initial state ``x(0)``: token embeddings plus what the source adds before its first layer.

    Args:
        vocab_size: number of token ids.
        d_model: state dimension d.
        max_positions: size of a learned absolute-position table (BERT, GPT-2), or None (RoPE
            models, whose positions enter through attention).
        segment: add one learned vector to every token: BERT's token type 0, the only segment a
            single-sequence input has.
        norm: applied last (BERT's embedding LayerNorm), or None.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        max_positions: int | None = None,
        segment: bool = False,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        self.word = nn.Embedding(vocab_size, d_model)
        self.position = None if max_positions is None else nn.Embedding(max_positions, d_model)
        self.segment = nn.Parameter(torch.zeros(d_model)) if segment else None
        self.norm = norm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        # A data-dependent check: eager only, so that torch.compile traces one graph.
        if not torch.compiler.is_compiling():
            lo, hi, V = int(input_ids.min()), int(input_ids.max()), self.word.num_embeddings
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must lie in [0, {V}), got range [{lo}, {hi}]")
        x = self.word(input_ids)  # (B, T, d)
        # The additions run in transformers' order (token, segment, position): same rounding.
        if self.segment is not None:
            x = x + self.segment
        if self.position is not None:
            if T > self.position.num_embeddings:
                raise ValueError(
                    f"sequence length {T} exceeds the model's {self.position.num_embeddings} "
                    f"learned positions"
                )
            x = x + self.position.weight[:T]  # (T, d) broadcast over the batch
        return x if self.norm is None else self.norm(x)
