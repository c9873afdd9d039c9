"""FLOPs per token of an SVFlow forward pass, counting every field evaluation.

Matmul FLOPs only (a multiply-add is 2 FLOPs), the convention of Kaplan et al. (2020) and
Chinchilla (Hoffmann et al. 2022, appendix F):

- attention, per token and evaluation: the q/k/v and output projections (``2 * in * out`` each),
  the scores ``q.k`` and the weighted sum of values, ``2 * context * n_heads * head_dim`` each,
  over the full context (no causal discount);
- any other field (FFN, SwiGLU, pre-norm wrappers): ``2 * in * out`` per ``nn.Linear`` inside it;
- the readout head: ``2 * d * vocab``; the embedding is a table lookup and costs no matmul FLOPs.

Norms, retractions, softmax, the interpolation of continuous-in-time parameters (per batch, not
per token) and solver arithmetic are not counted, including the Lie-algebra arithmetic of RKMK on
the sphere (``manifolds.LowRankSphereAction``: O(d k^2) per token and stage with k <= 2 x stages).
Training costs 3x the forward (the backward pass is twice the forward).
"""

from __future__ import annotations

from torch import nn

from .fields import AttentionField
from .model import SVFlow

__all__ = [
    "field_flops_per_token", "evaluations_per_term", "forward_flops_per_token",
    "training_flops_per_token",
]


def field_flops_per_token(field: nn.Module, context: int) -> int:
    """Matmul FLOPs per token of one evaluation of ``field`` over ``context`` tokens."""
    flops = sum(2 * m.in_features * m.out_features for m in field.modules() if isinstance(m, nn.Linear))
    for attention in (m for m in field.modules() if isinstance(m, AttentionField)):
        flops += 2 * 2 * context * attention.n_heads * attention.head_dim  # scores and weighted sum
    return flops


def evaluations_per_term(model: SVFlow, nfe: float) -> list[float]:
    """How many times each term of a block (attention, FFN, ...) is evaluated in ``nfe``.

    ``SolveStats.nfe`` counts one per evaluation of the field that is stepped: the summed field
    with ``splitting="none"``, one term with "lie" (each term once per stage), and with "strang"
    every term but the last twice per stage, the last once.
    """
    n = len(model.blocks[0].terms)
    if model.splitting == "none":
        return [nfe] * n
    if model.splitting == "lie":
        return [nfe / n] * n
    rounds = nfe / (2 * n - 1)
    return [2 * rounds] * (n - 1) + [rounds]


def forward_flops_per_token(model: SVFlow, nfe: float, context: int) -> float:
    """FLOPs per token of a forward pass that made ``nfe`` field evaluations (``out.stats.nfe``).

    Args:
        model: the SVFlow model (every block has the structure of ``model.blocks[0]``).
        nfe: field evaluations of the pass: its ``out.stats.nfe``, which counts only what ran (a
            pass at another depth, ``steps=k`` or pruned with ``layers=``, counts its own); a mean
            over passes where they differ (adaptive solvers, ``train_steps``, LayerDrop).
        context: sequence length (the attention span).
    """
    terms = model.blocks[0].terms
    flops = sum(count * field_flops_per_token(term.field, context)
                for count, term in zip(evaluations_per_term(model, nfe), terms))
    if isinstance(model.head, nn.Linear):
        flops += 2 * model.head.in_features * model.head.out_features
    return flops


def training_flops_per_token(model: SVFlow, nfe: float, context: int) -> float:
    """3x ``forward_flops_per_token``: forward plus a backward pass costing twice as much."""
    return 3 * forward_flops_per_token(model, nfe, context)

