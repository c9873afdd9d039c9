"""Building SVFlow language models from a handful of choices (the Transformer zoo as manifolds).

Norm placements, as manifolds and fields (docs/maths.md#normalisation-layers-as-retractions):

- ``post_ln``: the state on the LayerNorm sphere with each substep's affine chart (BERT);
- ``post_rms``: the state on the sphere of radius sqrt(d) with an RMSNorm gain as the chart;
- ``sphere``: the plain sphere of radius sqrt(d), no chart (SVFlow as the paper states it);
- ``pre_ln`` / ``pre_rms``: a Euclidean state, each field read at the normalised point (GPT-2,
  Llama), and a final norm;
- ``ngpt``: nGPT's normalised update ``Norm(x + alpha (Norm(f(x)) - x))`` on the sphere.
"""

from __future__ import annotations

import math

import geoopt
import torch
from torch import nn

from manifolds import AffineChart, LayerNormSphere, Sphere

from .embedding import TokenEmbedding
from .fields import AttentionField, FFNField, NGPTField, PreNorm
from solvers.defaults import ATOL, MAX_NFE, RTOL

from .model import Block, SVFlow, Term

__all__ = ["INITS", "NORMS", "SVFlowLM"]

NORMS = ("post_ln", "post_rms", "sphere", "pre_ln", "pre_rms", "ngpt")
INITS = ("nanogpt", "fan_in")


class _Projection(nn.Module):
    """A manifold's ``projx`` as a module (the embedding's normalisation onto a sphere)."""

    def __init__(self, manifold):
        super().__init__()
        self.manifold = manifold

    def forward(self, x):
        return self.manifold.projx(x)


def _layer(norm: str, d: int, n_heads: int, d_ff: int, causal: bool, eps: float) -> Block:
    fields = [AttentionField(d, n_heads, causal=causal), FFNField(d, d_ff)]
    if norm == "post_ln":
        return Block(*(Term(f, AffineChart(LayerNormSphere(eps), nn.Parameter(torch.ones(d)),
                                           nn.Parameter(torch.zeros(d)))) for f in fields))
    if norm == "post_rms":
        # RMSNorm has a gain and no shift: the chart's bias is a fixed zero.
        return Block(*(Term(f, AffineChart(Sphere(None, eps), nn.Parameter(torch.ones(d)), torch.zeros(d)))
                       for f in fields))
    # The pure spheres keep eps = 0: their states lie exactly on the sphere.
    if norm == "sphere":
        return Block(*(Term(f, Sphere(None)) for f in fields))
    if norm == "ngpt":
        sphere = Sphere(None)
        return Block(*(Term(NGPTField(f, sphere, d), sphere) for f in fields))
    make_norm = (lambda: nn.LayerNorm(d, eps=eps)) if norm == "pre_ln" else (lambda: nn.RMSNorm(d, eps=eps))
    return Block(*(Term(PreNorm(make_norm(), f), geoopt.Euclidean(ndim=1)) for f in fields))


class SVFlowLM(SVFlow):
    """A character/token language model as an SVFlow (nanoGPT-sized by default).

    Args:
        vocab_size: vocabulary size.
        d_model: state dimension.
        n_heads: attention heads.
        n_blocks: parameter sets (blocks); with ``time="shared"`` one block is built and
            integrated to the horizon ``T = n_blocks`` (the depth of its per-step sibling).
        d_ff: FFN width (default ``4 * d_model``).
        context: context length.
        norm: one of ``NORMS`` (see the module docstring).
        time: "per_step", "shared" or "continuous" parameters.
        method: default solver (``solvers.METHODS``).
        steps: default step count (default ``n_blocks``).
        splitting: "lie", "strang" or "none".
        mode: "relaxed" or "strict".
        gradient: "backprop" or "checkpoint".
        causal: causal attention (a language model) or not.
        eps: epsilon of every normalisation.
        rtol, atol, max_nfe: adaptive methods' tolerances and evaluation cap (``solvers.defaults``).
        init: "fan_in" (default) draws linear weights from ``N(0, 1 / fan_in)`` (LeCun) and keeps
            ``0.02`` for the embedding and the head tied to it; "nanogpt" draws every linear and
            embedding weight from ``N(0, 0.02^2)``, a scale made for ``d_model ~ 768``: below ~256
            dimensions it starts attention nearly uniform and trains slowly (a two-layer model sits
            for thousands of steps on associative recall before it forms an induction head; Tiny
            Shakespeare 1.900 vs 1.796 nats/char). Biases start at zero.
        layerdrop: LayerDrop's rate for per-step models (``SVFlow``): each block skipped with this
            probability per training batch; 0 (default) never.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_blocks: int = 4,
        d_ff: int | None = None,
        context: int = 64,
        norm: str = "post_ln",
        time: str = "per_step",
        method: str = "euler",
        steps: int | None = None,
        splitting: str = "lie",
        mode: str = "relaxed",
        gradient: str = "backprop",
        causal: bool = True,
        eps: float = 1e-5,
        rtol: float = RTOL,
        atol: float = ATOL,
        max_nfe: int = MAX_NFE,
        init: str = "fan_in",
        layerdrop: float = 0.0,
    ):
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_heads", n_heads),
                            ("n_blocks", n_blocks), ("context", context), ("d_ff", d_ff)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a non-negative finite number, got {eps!r}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        d_ff = 4 * d_model if d_ff is None else d_ff
        blocks = [_layer(norm, d_model, n_heads, d_ff, causal, eps) for _ in range(1 if time == "shared" else n_blocks)]
        if norm == "post_ln":
            normalise = nn.LayerNorm(d_model, eps=eps)
        elif norm == "post_rms":
            normalise = _Projection(Sphere(None, eps))
        elif norm in ("sphere", "ngpt"):
            normalise = _Projection(Sphere(None))
        else:
            normalise = None
        embed = TokenEmbedding(vocab_size, d_model, context, norm=normalise)
        final_norm = {"pre_ln": nn.LayerNorm(d_model, eps=eps), "pre_rms": nn.RMSNorm(d_model, eps=eps)}.get(norm)
        head = nn.Linear(d_model, vocab_size, bias=False)
        head.weight = embed.word.weight  # tied, as in nanoGPT
        super().__init__(
            embed, blocks, time=time, horizon=n_blocks if time == "shared" else None, method=method,
            steps=steps, mode=mode, splitting=splitting, gradient=gradient, rtol=rtol, atol=atol,
            max_nfe=max_nfe, final_norm=final_norm, head=head, layerdrop=layerdrop,
        )
        self.vocab_size, self.context, self.norm = vocab_size, context, norm
        _init_weights(self, init)


def _init_weights(model: nn.Module, init: str) -> None:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # The tied head is an nn.Linear holding the embedding's weight: it keeps 0.02.
            fan_in = init == "fan_in" and id(module.weight) not in embeddings
            nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5 if fan_in else 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
