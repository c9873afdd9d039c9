"""Runge-Kutta-Munthe-Kaas: the same tableaus, stepping through a Lie-group action."""

from __future__ import annotations

from typing import Callable

import torch

from manifolds.lie import Frame

from .base import StepResult
from .tableau import ButcherTableau

__all__ = ["RKMK"]


def _weighted_sum(ks: list, weights, h: float):
    """``h sum_j weights[j] ks[j]`` over the nonzero weights, with ``+`` and ``*`` by a number only:
    the action decides how algebra elements are stored (dense matrices, factored, coordinates).
    Tensors take one fused ``add`` per term."""
    out = None
    for k, w in zip(ks, weights):
        if w:
            if out is None:
                out = k * (h * w)
            elif isinstance(k, torch.Tensor):
                out = torch.add(out, k, alpha=h * w)
            else:
                out = out + k * (h * w)
    return out


class RKMK:
    """Runge-Kutta-Munthe-Kaas method (Munthe-Kaas 1999) over an SO(n) action.

    With ``k_i = generator(x_i, f(t_i, x_i))`` the skew generator of the field at stage ``i``:

        theta_i = h sum_j a_ij dexpinv(theta_j, k_j),   x_i = exp(theta_i) x,
        x_new   = exp(h sum_i b_i dexpinv(theta_i, k_i)) x.

    The state moves only by group elements, so it stays on the manifold by construction (a final
    ``projx`` removes float rounding). Order = the tableau's order when ``dexpinv`` keeps its
    Bernoulli terms up to ``ad^(order-2)``, which this class does. No error estimate.

    A step works through the action's ``frame(x, stages)`` (``manifolds.lie.Frame``): how it names
    the step's points and elements. ``LowRankSphereAction``'s frames do a step in coordinates with
    few small tensor operations (on CPU a small state's step costs about the count of operations);
    an action without ``frame`` gets the default, which calls its ``generator``, ``exp``, ``act``
    and ``dexpinv``.

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
        tab = self.tableau
        make = getattr(self.action, "frame", None)
        frame = Frame(self.action, x) if make is None else make(x, tab.stages)
        ks = []  # dexpinv-corrected generators
        for i in range(tab.stages):
            ti = torch.tensor(t + tab.c[i] * h, dtype=x.dtype)
            if i == 0:
                ks.append(frame.generator(frame.base, f(ti, x) if k_first is None else k_first))
                continue
            theta = _weighted_sum(ks, tab.a[i], h)
            xi = frame.move(theta)
            ks.append(frame.corrected(theta, xi, f(ti, frame.point(xi)), tab.order))
        theta = _weighted_sum(ks, tab.b, h)
        return StepResult(manifold.projx(frame.point(frame.move(theta))))
