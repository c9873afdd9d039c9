"""BERT (post-LN): each sublayer is a relaxed Euler step retracted through a LayerNorm chart.

``x <- LN_1(x + attn(x)); x <- LN_2(x + ffn(x))`` is ``retr(x, h f(x))`` with ``h = 1`` on
``AffineChart(LayerNormSphere(eps), gamma, beta)`` (see docs/maths.md#post-ln-as-an-affine-chart).
"""

from __future__ import annotations

import torch
from torch import nn

from manifolds import AffineChart, LayerNormSphere

from ..fields import AttentionField, FFNField
from ..model import Block, SVFlow, Term
from ..embedding import TokenEmbedding
from .layers import activation
from .mapping import WeightMap, same

PREFIX = "bert."  # where BertFor... models keep their BertModel


def build(config, head: bool) -> SVFlow:
    """The SVFlow skeleton for a ``BertConfig`` (``head`` is unused: BERT heads are not converted)."""
    if getattr(config, "add_cross_attention", False):
        raise ValueError("bert: cross-attention (add_cross_attention=True) is not supported")
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"bert: position_embedding_type={position!r} is not supported, only 'absolute'")
    d, eps = config.hidden_size, config.layer_norm_eps

    def chart():
        return AffineChart(LayerNormSphere(eps), nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)))

    blocks = [
        Block(
            Term(AttentionField(d, config.num_attention_heads, causal=config.is_decoder), chart()),
            Term(FFNField(d, config.intermediate_size, activation(config.hidden_act)), chart()),
        )
        for _ in range(config.num_hidden_layers)
    ]
    embed = TokenEmbedding(
        config.vocab_size, d, config.max_position_embeddings, segment=True, norm=nn.LayerNorm(d, eps=eps)
    )
    return SVFlow(embed, blocks, time="continuous")


def weight_map(config, head: bool) -> WeightMap:
    """Our parameter names -> ``BertModel`` state-dict keys."""
    w: WeightMap = {
        "embed.word.weight": ("embeddings.word_embeddings.weight", None),
        "embed.position.weight": ("embeddings.position_embeddings.weight", None),
        "embed.segment": ("embeddings.token_type_embeddings.weight", lambda t: t[0]),  # token type 0
        **same("embed.norm", "embeddings.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"blocks.{i}.terms", f"encoder.layer.{i}"
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
            w |= same(f"{ours}.0.field.{proj}", f"{theirs}.attention.self.{name}")
        w |= same(f"{ours}.0.field.o", f"{theirs}.attention.output.dense")
        w |= same(f"{ours}.0.manifold", f"{theirs}.attention.output.LayerNorm")
        w |= same(f"{ours}.1.field.up", f"{theirs}.intermediate.dense")
        w |= same(f"{ours}.1.field.down", f"{theirs}.output.dense")
        w |= same(f"{ours}.1.manifold", f"{theirs}.output.LayerNorm")
    return w
