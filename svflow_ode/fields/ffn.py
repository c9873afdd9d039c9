"""Feed-forward fields: the relaxed (unnormalised) SVFlow sum over hidden units.

See docs/maths.md#ffn-and-moe-as-relaxed-fields.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FFNField", "SwiGLUField"]


class FFNField(nn.Module):
    """``f(t, x) = W_2 act(W_1 x + b_1) + b_2``.

    Args:
        d_model: state dimension.
        d_ff: hidden width.
        activation: the non-linearity module (``nn.GELU()`` for BERT, ``nn.GELU("tanh")`` for
            GPT-2, ``nn.ReLU()`` for ``nn.TransformerEncoderLayer``).
        bias: biases on both projections.
    """

    def __init__(self, d_model: int, d_ff: int, activation: nn.Module | None = None, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.act = nn.GELU() if activation is None else activation
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, t, x: torch.Tensor, **context) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class SwiGLUField(nn.Module):
    """``f(t, x) = W_down (silu(W_gate x) * W_up x)`` (Llama/Qwen2 MLP)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, t, x: torch.Tensor, **context) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
