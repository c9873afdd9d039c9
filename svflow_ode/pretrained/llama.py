"""Llama and Qwen2 (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU).

``x <- x + attn(RMSNorm_1(x)); x <- x + mlp(RMSNorm_2(x))`` on Euclidean space, then the final
RMSNorm. Qwen2 differs only in biases (on q, k, v; none on o) and in optional sliding-window
layers, which are not supported. The rotary angles and the RMSNorm run in float32 as in
transformers, so that float64 conversions match it to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from manifolds import Euclidean

from ..fields import AttentionField, PreNorm, SwiGLUField
from ..model import Block, SVFlow, Term
from ..embedding import TokenEmbedding
from .layers import RMSNorm
from .mapping import WeightMap, same

PREFIX = "model."  # where ...ForCausalLM keeps its base model


def rope_theta(config) -> float:
    """The RoPE base, refusing the scaled variants (linear, dynamic, YaRN, Llama 3)."""
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    if params is None:  # transformers 4
        params = {"rope_theta": config.rope_theta, **(getattr(config, "rope_scaling", None) or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{config.model_type}: rope_type={kind!r} is not supported, only 'default'")
    return float(params["rope_theta"])


def _biases(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, output bias, MLP bias)."""
    if config.model_type == "qwen2":
        return True, False, False
    return config.attention_bias, config.attention_bias, config.mlp_bias


def build(config, head: bool) -> SVFlow:
    """The SVFlow skeleton for a ``LlamaConfig`` or ``Qwen2Config``; with ``head``, the LM head."""
    if config.hidden_act != "silu":
        raise ValueError(f"{config.model_type}: hidden_act={config.hidden_act!r} is not supported, only 'silu'")
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError(f"{config.model_type}: sliding-window attention layers are not supported")
    d, eps = config.hidden_size, config.rms_norm_eps
    qkv_bias, out_bias, mlp_bias = _biases(config)
    attention = dict(
        d_model=d,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or d // config.num_attention_heads,
        bias=qkv_bias,
        out_bias=out_bias,
        causal=True,
        rope_theta=rope_theta(config),
        rope_dtype=torch.float32,
    )

    def term(field):  # a Euclidean step of the field read at the RMS-normalised point
        return Term(PreNorm(RMSNorm(d, eps), field), Euclidean(ndim=1))

    blocks = [
        Block(term(AttentionField(**attention)), term(SwiGLUField(d, config.intermediate_size, bias=mlp_bias)))
        for _ in range(config.num_hidden_layers)
    ]
    return SVFlow(
        TokenEmbedding(config.vocab_size, d),
        blocks,
        time="continuous",
        final_norm=RMSNorm(d, eps),
        head=nn.Linear(d, config.vocab_size, bias=False) if head else None,
    )


def weight_map(config, head: bool) -> WeightMap:
    """Our parameter names -> ``LlamaModel``/``Qwen2Model`` state-dict keys (``lm_head`` for the head)."""
    qkv_bias, out_bias, mlp_bias = _biases(config)

    def linear(ours, theirs, bias):
        return same(ours, theirs, ("weight", "bias") if bias else ("weight",))

    w: WeightMap = {"embed.word.weight": ("embed_tokens.weight", None)}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"blocks.{i}.terms", f"layers.{i}"
        w |= same(f"{ours}.0.field.norm", f"{theirs}.input_layernorm", ("weight",))
        for proj in "qkv":
            w |= linear(f"{ours}.0.field.field.{proj}", f"{theirs}.self_attn.{proj}_proj", qkv_bias)
        w |= linear(f"{ours}.0.field.field.o", f"{theirs}.self_attn.o_proj", out_bias)
        w |= same(f"{ours}.1.field.norm", f"{theirs}.post_attention_layernorm", ("weight",))
        for proj in ("gate", "up", "down"):
            w |= linear(f"{ours}.1.field.field.{proj}", f"{theirs}.mlp.{proj}_proj", mlp_bias)
    w |= same("final_norm", "norm", ("weight",))
    if head:
        w["head.weight"] = ("embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight", None)
    return w
