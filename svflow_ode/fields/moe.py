"""Mixture of experts as an SVFlow field: router softmax = posterior over experts, experts = scores.

Nothing ties the router to the experts' likelihoods (unlike attention, whose posterior and scores
share the token states), which is the paper's explanation of router collapse (see
docs/maths.md#ffn-and-moe-as-relaxed-fields).
"""

from __future__ import annotations

import torch
from torch import nn

from .ffn import FFNField

__all__ = ["MoEField", "Router"]


class Router(nn.Linear):
    """The posterior over experts: ``router(x) = q(e|x) = softmax(W x)``, ``(..., n_experts)``.

    A linear layer (its parameter is still ``router.weight``) whose output is the probabilities,
    so a forward hook on it sees the posterior of every call without the field storing anything::

        probs = []
        handle = field.router.register_forward_hook(lambda module, args, out: probs.append(out))

    ``logits(x)`` gives ``W x`` before the softmax.
    """

    def __init__(self, d_model: int, n_experts: int):
        super().__init__(d_model, n_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(-1)


class MoEField(nn.Module):
    """``f(t, x) = sum_{e in top-k} q(e|x) expert_e(x)`` with ``q = router(x)``.

    The full posterior ``(..., n_experts)`` of each call is the output of the ``router``
    submodule: read it with a forward hook on ``field.router`` (for load-balancing losses and
    diagnostics; it is part of the autograd graph). The forward pass writes no attribute.

    Args:
        d_model: state dimension.
        d_ff: hidden width of each expert.
        n_experts: number of experts.
        top_k: experts used per token.
        renormalise: rescale the top-k probabilities to sum to 1.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int = 2, renormalise: bool = True):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.router = Router(d_model, n_experts)
        self.experts = nn.ModuleList(FFNField(d_model, d_ff) for _ in range(n_experts))
        self.top_k, self.renormalise = top_k, renormalise

    def forward(self, t, x: torch.Tensor, **context) -> torch.Tensor:
        probs = self.router(x)  # (..., E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (..., k)
        if self.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        flat_x = x.reshape(-1, x.shape[-1])  # (N, d)
        flat_w, flat_c = weights.reshape(-1, self.top_k), chosen.reshape(-1, self.top_k)
        out = torch.zeros_like(flat_x)
        for e, expert in enumerate(self.experts):
            token, slot = (flat_c == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, flat_w[token, slot, None] * expert(t, flat_x[token]))
        return out.view_as(x)
