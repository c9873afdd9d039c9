"""The pieces of a pretrained network that are neither fields nor embeddings: RMSNorm, activations."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "activation"]


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
