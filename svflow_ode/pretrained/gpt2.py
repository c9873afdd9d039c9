"""GPT-2 (pre-LN): Euclidean Euler steps of fields read at the LayerNorm-ed point.

``x <- x + attn(LN_1(x)); x <- x + ffn(LN_2(x))``, then ``ln_f`` on the last state. GPT-2's
``Conv1D`` stores weights as ``(in, out)``, the transpose of ``nn.Linear``; ``c_attn`` holds q, k
and v side by side.
"""

from __future__ import annotations

import math

from torch import nn

from manifolds import Euclidean

from ..fields import AttentionField, FFNField, PreNorm
from ..model import Block, SVFlow, Term
from ..embedding import TokenEmbedding
from .layers import activation
from .mapping import WeightMap, same

PREFIX = "transformer."  # where GPT2LMHeadModel keeps its GPT2Model


def build(config, head: bool) -> SVFlow:
    """The SVFlow skeleton for a ``GPT2Config``; with ``head``, the (tied) LM head too."""
    if config.add_cross_attention:
        raise ValueError("gpt2: cross-attention (add_cross_attention=True) is not supported")
    d, eps = config.hidden_size, config.layer_norm_epsilon
    d_ff = 4 * d if config.n_inner is None else config.n_inner

    def term(field):  # a Euclidean step of the field read at the LayerNorm-ed point
        return Term(PreNorm(nn.LayerNorm(d, eps=eps), field), Euclidean(ndim=1))

    blocks = [
        Block(
            term(AttentionField(d, config.num_attention_heads, causal=True)),
            term(FFNField(d, d_ff, activation(config.activation_function))),
        )
        for _ in range(config.num_hidden_layers)
    ]
    return SVFlow(
        TokenEmbedding(config.vocab_size, d, config.max_position_embeddings),
        blocks,
        time="continuous",
        final_norm=nn.LayerNorm(d, eps=eps),
        head=nn.Linear(d, config.vocab_size, bias=False) if head else None,
    )


def _conv1d(part: int = 0, parts: int = 1, scale: float = 1.0):
    """Conv1D ``(in, parts * out)`` -> the Linear weight ``(out, in)`` of one part, times ``scale``."""

    def transform(w):
        out = w.shape[-1] // parts
        w = w[..., part * out : (part + 1) * out]
        return (w.T if w.dim() == 2 else w) * scale  # a weight transposes; a bias is sliced only

    return transform


def _query_scale(config, layer: int) -> float:
    """Factor folded into W_q, b_q so that the field's ``1/sqrt(hs)`` gives GPT-2's attention scale."""
    scale = 1.0 if config.scale_attn_weights else math.sqrt(config.hidden_size // config.num_attention_heads)
    return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale


def weight_map(config, head: bool) -> WeightMap:
    """Our parameter names -> ``GPT2Model`` state-dict keys (``lm_head`` for the head)."""
    w: WeightMap = {"embed.word.weight": ("wte.weight", None), "embed.position.weight": ("wpe.weight", None)}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"blocks.{i}.terms", f"h.{i}"
        w |= same(f"{ours}.0.field.norm", f"{theirs}.ln_1")
        for part, proj in enumerate("qkv"):
            scale = _query_scale(config, i) if proj == "q" else 1.0
            for p in ("weight", "bias"):
                w[f"{ours}.0.field.field.{proj}.{p}"] = (f"{theirs}.attn.c_attn.{p}", _conv1d(part, 3, scale))
        w |= same(f"{ours}.1.field.norm", f"{theirs}.ln_2")
        for ours_lin, theirs_conv in (("0.field.field.o", "attn.c_proj"), ("1.field.field.up", "mlp.c_fc"),
                                      ("1.field.field.down", "mlp.c_proj")):
            w[f"{ours}.{ours_lin}.weight"] = (f"{theirs}.{theirs_conv}.weight", _conv1d())
            w[f"{ours}.{ours_lin}.bias"] = (f"{theirs}.{theirs_conv}.bias", None)
    w |= same("final_norm", "ln_f")
    if head:
        w["head.weight"] = ("wte.weight" if config.tie_word_embeddings else "lm_head.weight", None)
    return w
