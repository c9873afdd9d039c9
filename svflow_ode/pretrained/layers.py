"""The pieces of a pretrained network that are not vector fields: embeddings, RMSNorm, activations."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenEmbedding", "RMSNorm", "activation"]


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


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in ``compute_dtype``.

    transformers' Llama and Qwen2 cast to float32 for the normalisation whatever the model's dtype
    (so a float64 model is only float32-accurate here) and multiply by ``weight`` in the input
    dtype. The default reproduces that, which is what lets a float64 conversion match to 1e-10.

    Args:
        d_model: state dimension.
        eps: added to the mean square.
        compute_dtype: the dtype of the normalisation.
    """

    def __init__(self, d_model: int, eps: float = 1e-6, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps, self.compute_dtype = eps, compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(self.compute_dtype)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps:g}, compute_dtype={self.compute_dtype}"


# transformers' activation names (``hidden_act``, ``activation_function``) that have a torch module
# computing the same function.
_ACTIVATIONS = {
    "gelu": nn.GELU,  # exact (erf) GELU
    "gelu_new": lambda: nn.GELU("tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU("tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    """The torch module for a transformers activation name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()
