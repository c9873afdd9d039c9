"""Attention as the spherical SVFlow field with a von Mises-Fisher posterior.

For token i and context token j, one head contributes ``sum_j q(j|x_i) W_o W_v x_j`` with the
posterior ``q(j|x_i) = softmax_j((W_q x_i).(W_k x_j) / sqrt(d_k))``: a vMF kernel of concentration
``kappa_ij = |W_q x_i| |W_k x_j| / sqrt(d_k)`` on the cosine of query and key. The scores
``W_o W_v x_j`` are the conditional log-likelihood scores. Heads form a mixture (their sum).
See docs/maths.md#the-vmf-posterior.

``forward`` is the fast path (``scaled_dot_product_attention``); ``posterior`` exposes q, the
scores and the concentrations for diagnostics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionField", "rotary", "attention_bias"]


def rotary(x: torch.Tensor, theta: float, offset: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Rotary position embedding (half-split convention of GPT-NeoX/Llama) on ``(B, H, T, hs)``.

    ``dtype`` is the precision of the angles and their cos/sin (transformers uses float32).
    """
    T, hs = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=dtype, device=x.device) / hs)
    angles = torch.arange(offset, offset + T, dtype=dtype, device=x.device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_bias(
    attention_mask: torch.Tensor | None, T: int, causal: bool, dtype, device
) -> torch.Tensor | None:
    """Additive bias ``(B or 1, 1, T, T)``: -inf where a key is padding or in the future.

    Args:
        attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding (transformers'
            convention), or None.
    """
    if attention_mask is None and not causal:
        return None
    allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def _check_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> None:
    # Broadcasting would accept some wrong shapes silently and fail on others deep inside SDPA.
    if attention_mask is not None and tuple(attention_mask.shape) not in ((B, T), (1, T)):
        raise ValueError(f"attention_mask must be (batch, sequence) = ({B}, {T}), got {tuple(attention_mask.shape)}")


class AttentionField(nn.Module):
    """Multi-head (optionally grouped-query) self-attention as a vector field ``f(t, x)``.

    Args:
        d_model: state dimension d.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (grouped-query attention); default ``n_heads``.
        head_dim: per-head dimension; default ``d_model // n_heads``.
        bias: biases on the q/k/v projections.
        out_bias: bias on the output projection (default: same as ``bias``).
        causal: mask future tokens.
        rope_theta: base of rotary position embeddings, or None for none.
        rope_dtype: precision of the rotary angles (float32 reproduces transformers' Llama/Qwen2
            bit for bit, whatever the model's dtype).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        causal: bool = False,
        rope_theta: float | None = None,
        rope_dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.rope_theta, self.rope_dtype = causal, rope_theta, rope_dtype
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=bias if out_bias is None else out_bias)

    def _qkv(self, x: torch.Tensor):
        B, T, _ = x.shape
        # One matmul for q, k and v (markedly faster than three on CPU); the weights stay three
        # modules so that checkpoints and conversions map one-to-one.
        biases = (self.q.bias, self.k.bias, self.v.bias)
        qkv = F.linear(
            x,
            torch.cat((self.q.weight, self.k.weight, self.v.weight)),
            None if biases[0] is None else torch.cat(biases),
        )
        q, k, v = qkv.split((self.q.out_features, self.k.out_features, self.v.out_features), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rope_theta is not None:
            q = rotary(q, self.rope_theta, dtype=self.rope_dtype)
            k = rotary(k, self.rope_theta, dtype=self.rope_dtype)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, T, hs)
        return q, k, v

    def forward(self, t, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        _check_mask(attention_mask, B, T)
        q, k, v = self._qkv(x)
        if attention_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            bias = attention_bias(attention_mask, T, self.causal, q.dtype, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)

    def posterior(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """The field's parts, for diagnostics.

        Returns a dict with
            ``q``: posterior ``q(j|x_i)``, ``(B, nh, T, T)``;
            ``scores``: per-head scores ``W_o^h W_v^h x_j``, ``(B, nh, T, d)``;
            ``kappa``: concentrations ``|W_q x_i| |W_k x_j| / sqrt(hs)``, ``(B, nh, T, T)``;
            ``field``: ``sum_h sum_j q scores + output bias``, equal to ``forward``.
        """
        B, T, d = x.shape
        _check_mask(attention_mask, B, T)
        q, k, v = self._qkv(x)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        bias = attention_bias(attention_mask, T, self.causal, q.dtype, q.device)
        if bias is not None:
            logits = logits + bias
        post = logits.softmax(-1)
        w_o = self.o.weight.view(d, self.n_heads, self.head_dim)  # (d, nh, hs)
        scores = torch.einsum("bhjs,dhs->bhjd", v, w_o)  # (B, nh, T, d)
        kappa = q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :] / math.sqrt(self.head_dim)
        field = torch.einsum("bhij,bhjd->bid", post, scores)
        if self.o.bias is not None:
            field = field + self.o.bias
        return {"q": post, "scores": scores, "kappa": kappa, "field": field}
