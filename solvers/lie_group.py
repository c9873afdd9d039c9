"""Runge-Kutta-Munthe-Kaas: the same tableaus, stepping through a Lie-group action."""

from __future__ import annotations

from typing import Callable

import torch

from .base import StepResult
from .tableau import ButcherTableau

__all__ = ["RKMK"]


def _weighted_sum(ks: list, weights, h: float):
    """``h sum_j weights[j] ks[j]`` over the nonzero weights, with ``+`` and ``*`` by a number only:
    the action decides how algebra elements are stored (dense matrices or factored)."""
    terms = [k * (h * w) for k, w in zip(ks, weights) if w]
    return sum(terms[1:], terms[0])


class RKMK:
    """Runge-Kutta-Munthe-Kaas method (Munthe-Kaas 1999) over an SO(n) action.

    With ``k_i = generator(x_i, f(t_i, x_i))`` the skew generator of the field at stage ``i``:

        theta_i = h sum_j a_ij dexpinv(theta_j, k_j),   x_i = exp(theta_i) x,
        x_new   = exp(h sum_i b_i dexpinv(theta_i, k_i)) x.

    The state moves only by group elements, so it stays on the manifold by construction (a final
    ``projx`` removes float rounding). Order = the tableau's order when ``dexpinv`` keeps its
    Bernoulli terms up to ``ad^(order-2)``, which this class does. No error estimate.

    Args:
        tableau: an explicit tableau (Heun gives RKMK2, classic RK4 gives RKMK4).
        action: e.g. ``manifolds.LowRankSphereAction``; its ``manifold`` is where the state lives.
    """

    error_order = None
    fsal = False
    strict = True  # the group acts on points of the manifold

    def __init__(self, tableau: ButcherTableau, action):
        self.tableau = tableau
        self.action = action

    @property
    def order(self) -> int:
        return self.tableau.order

    def __repr__(self):
        return f"RKMK({self.tableau.name}, action={type(self.action).__name__})"

    def step(self, f: Callable, t: float, x: torch.Tensor, h: float, manifold, k_first=None) -> StepResult:
        """Advance one step (the ``Solver`` contract; no error estimate). ``k_first``, the field
        at ``(t, x)`` when known, saves the first stage's evaluation."""
        tab, act = self.tableau, self.action
        ks = []  # dexpinv-corrected generators
        for i in range(tab.stages):
            ti = torch.tensor(t + tab.c[i] * h, dtype=x.dtype)
            if i == 0:
                ks.append(act.generator(x, f(ti, x) if k_first is None else k_first))
                continue
            theta = _weighted_sum(ks, tab.a[i], h)
            xi = act.act(act.exp(theta), x)
            ks.append(act.dexpinv(theta, act.generator(xi, f(ti, xi)), tab.order))
        theta = _weighted_sum(ks, tab.b, h)
        return StepResult(manifold.projx(act.act(act.exp(theta), x)))
