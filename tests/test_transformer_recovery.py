"""Euler + retraction is a Transformer: SVFlow stacks equal independent Transformer code.

References: a post-RMSNorm Transformer written here in plain PyTorch, and
``torch.nn.TransformerEncoderLayer`` (post-LN and pre-LN) with copied weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svflow_ode.lm import SVFlowLM

D, HEADS, LAYERS, FF, T, B = 32, 4, 3, 64, 10, 3


def _reference_post_rms(x, model, mask=None):
    """x <- RMSNorm(x + MHA(x)); x <- RMSNorm(x + FFN(x)), written from scratch."""
    hs = D // HEADS
    states = [x]
    for block in model.blocks:
        attn, ffn = block.terms[0].field, block.terms[1].field
        g1, g2 = block.terms[0].manifold.weight, block.terms[1].manifold.weight

        def rms(y, g):
            return F.rms_norm(y, (D,), g, eps=1e-5)

        q = (x @ attn.q.weight.T + attn.q.bias).view(B, T, HEADS, hs).transpose(1, 2)
        k = (x @ attn.k.weight.T + attn.k.bias).view(B, T, HEADS, hs).transpose(1, 2)
        v = (x @ attn.v.weight.T + attn.v.bias).view(B, T, HEADS, hs).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(hs)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = rms(x + a @ attn.o.weight.T + attn.o.bias, g1)
        hidden = F.gelu(x @ ffn.up.weight.T + ffn.up.bias)
        x = rms(x + hidden @ ffn.down.weight.T + ffn.down.bias, g2)
        states.append(x)
    return states


def _perturb_charts(model):
    # Non-trivial gains and shifts, so that the charts are really exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("masked", [False, True])
def test_euler_on_sphere_is_post_rmsnorm_transformer(dtype, tol, masked):
    torch.manual_seed(0)
    model = SVFlowLM(50, D, HEADS, LAYERS, FF, context=T, norm="post_rms", init="nanogpt").to(dtype)
    _perturb_charts(model)
    x0 = model.blocks[0].terms[0].manifold.base.projx(torch.randn(B, T, D, dtype=dtype))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    context = {"attention_mask": mask} if masked else {}
    ours, _ = model.flow(x0, method="euler", steps=LAYERS, context=context)
    ref = _reference_post_rms(x0, model, mask if masked else None)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() <= tol


def _copy_to_torch_layer(block, layer, norm_first):
    attn, ffn = block.terms[0].field, block.terms[1].field
    if norm_first:  # PreNorm(norm, field)
        (norm1, attn), (norm2, ffn) = (attn.norm, attn.field), (ffn.norm, ffn.field)
    else:
        norm1, norm2 = block.terms[0].manifold, block.terms[1].manifold
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        layer.self_attn.out_proj.weight.copy_(attn.o.weight)
        layer.self_attn.out_proj.bias.copy_(attn.o.bias)
        layer.linear1.weight.copy_(ffn.up.weight)
        layer.linear1.bias.copy_(ffn.up.bias)
        layer.linear2.weight.copy_(ffn.down.weight)
        layer.linear2.bias.copy_(ffn.down.bias)
        layer.norm1.weight.copy_(norm1.weight)
        layer.norm1.bias.copy_(norm1.bias)
        layer.norm2.weight.copy_(norm2.weight)
        layer.norm2.bias.copy_(norm2.bias)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_euler_equals_torch_transformer_encoder_layer(norm_first, dtype, tol):
    torch.manual_seed(1)
    model = SVFlowLM(50, D, HEADS, LAYERS, FF, context=T, norm="pre_ln" if norm_first else "post_ln").to(dtype)
    _perturb_charts(model)
    layers = [
        nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu", layer_norm_eps=1e-5,
                                   batch_first=True, norm_first=norm_first, dtype=dtype)
        for _ in range(LAYERS)
    ]
    for block, layer in zip(model.blocks, layers):
        _copy_to_torch_layer(block, layer, norm_first)
        layer.train()  # dropout is 0; train mode keeps PyTorch off its fused inference fast path
    x0 = torch.randn(B, T, D, dtype=dtype)
    if not norm_first:
        x0 = F.layer_norm(x0, (D,))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -4:] = 0
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = not allowed
    ours, _ = model.flow(x0, method="euler", steps=LAYERS, context={"attention_mask": mask})
    x = x0
    for i, layer in enumerate(layers):
        x = layer(x, src_mask=causal, src_key_padding_mask=mask == 0)
        assert (ours[i + 1] - x).abs().max().item() <= tol
