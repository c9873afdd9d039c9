"""Composing fields: sums, pre-normalised reads, nGPT updates, and time dependence."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["SumField", "PreNorm", "NGPTField", "Interpolated", "locate"]


def locate(t: float, K: int) -> tuple[int, float]:
    """``(k, w)`` for time ``t`` among K nodes at ``0..K-1``: left node and right node's weight."""
    t = float(t.detach() if isinstance(t, torch.Tensor) else t)  # the adjoint's t carries grad
    t = min(max(t, 0.0), K - 1.0)
    k = min(int(t), K - 2) if K > 1 else 0
    return k, t - k


class SumField(nn.Module):
    """``f(t, x) = sum_i f_i(t, x)`` (the unsplit field of a block: attention + FFN)."""

    def __init__(self, *fields: nn.Module):
        super().__init__()
        self.fields = nn.ModuleList(fields)

    def forward(self, t, x, **context):
        return sum(f(t, x, **context) for f in self.fields)


class PreNorm(nn.Module):
    """The field read at the normalised point: ``f(t, norm(x))`` (pre-LN GPT-2, pre-RMSNorm Llama)."""

    def __init__(self, norm: nn.Module, field: nn.Module):
        super().__init__()
        self.norm = norm
        self.field = field

    def forward(self, t, x, **context):
        return self.field(t, self.norm(x), **context)


class NGPTField(nn.Module):
    """nGPT's normalised update as a field: ``alpha * (normalise(f(t, x)) - x)``.

    With relaxed Euler on the sphere this is nGPT's ``x <- Norm(x + alpha (Norm(f(x)) - x))``.

    Args:
        field: the inner field (attention or FFN).
        manifold: the sphere whose ``projx`` normalises ``f``.
        d_model: state dimension (for the per-coordinate step sizes ``alpha``).
        alpha: initial value of the learnable per-coordinate step sizes.
    """

    def __init__(self, field: nn.Module, manifold, d_model: int, alpha: float = 0.05):
        super().__init__()
        self.field = field
        self.manifold = manifold
        self.alpha = nn.Parameter(torch.full((d_model,), alpha))

    def forward(self, t, x, **context):
        return self.alpha * (self.manifold.projx(self.field(t, x, **context)) - x)


class Interpolated(nn.Module):
    """Parameters continuous in t: linear interpolation between K parameter sets at ``t = 0..K-1``.

    ``Interpolated(modules)(t, x)`` evaluates ``modules[0]``'s code with the parameters
    ``(1 - w) theta_k + w theta_{k+1}``, ``k = floor(t)``, ``w = t - k`` (constant beyond the ends).
    At integer times it is exactly module ``k``, so Euler with unit steps reproduces a
    per-layer stack, and any other step count integrates the same continuous field.

    Args:
        modules: K modules of identical structure.
    """

    def __init__(self, modules):
        super().__init__()
        self.nodes = nn.ModuleList(modules)
        names = [[n for n, _ in m.named_parameters()] for m in self.nodes]
        if any(n != names[0] for n in names):
            raise ValueError("Interpolated needs modules with identical parameter names")

    def params_at(self, t: float) -> dict[str, torch.Tensor] | int:
        """The interpolated parameters at ``t``, or the node index when ``t`` is on a node."""
        k, w = locate(t, len(self.nodes))
        if w == 0.0:
            return k
        if w == 1.0:
            return k + 1
        left, right = dict(self.nodes[k].named_parameters()), dict(self.nodes[k + 1].named_parameters())
        return {n: torch.lerp(p, right[n], w) for n, p in left.items()}

    def forward(self, t, x, **context):
        params = self.params_at(t)
        if isinstance(params, int):
            return self.nodes[params](t, x, **context)
        return functional_call(self.nodes[0], params, (t, x), context)
