"""SVFlow vector fields: ``nn.Module``s with ``forward(t, x, **context)``."""

from .attention import AttentionField, attention_bias, rotary
from .compose import Interpolated, NGPTField, PreNorm, SumField, locate
from .ffn import FFNField, SwiGLUField
from .gaussian import GaussianMixtureField
from .moe import MoEField, Router

__all__ = [
    "AttentionField", "FFNField", "GaussianMixtureField", "Interpolated", "MoEField", "NGPTField",
    "PreNorm", "Router", "SumField", "SwiGLUField", "attention_bias", "locate", "rotary",
]
