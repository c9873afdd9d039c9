"""Runge-Kutta-Munthe-Kaas: the same tableaus, stepping through a Lie-group action."""

from __future__ import annotations

from typing import Callable

import torch

from manifolds.lie import Frame, dexpinv

from .base import StepResult
from .tableau import RK4, ButcherTableau

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


def _is_classic_rk4(tableau: ButcherTableau) -> bool:
    return (tableau.c, tableau.a, tableau.b) == (RK4.c, RK4.a, RK4.b)


class RKMK:
    """Runge-Kutta-Munthe-Kaas method (Munthe-Kaas 1999) over an SO(n) action.

    With ``k_i = generator(x_i, f(t_i, x_i))`` the skew generator of the field at stage ``i``:

        theta_i = h sum_j a_ij dexpinv(theta_j, k_j),   x_i = exp(theta_i) x,
        x_new   = exp(h sum_i b_i dexpinv(theta_i, k_i)) x.

    The state moves only by group elements, so it stays on the manifold by construction (a final
    ``projx`` removes float rounding). Order = the tableau's order when ``dexpinv`` keeps its
    Bernoulli terms up to ``ad^(order-2)``, which this class does: no bracket at order <= 2.
    The classic RK4 tableau takes the equivalent form of Munthe-Kaas and Owren (1999, "Computations
    in a free Lie algebra"), order 4 with two brackets instead of six:

        x_2 = exp(h k_1 / 2) x,   x_3 = exp(h k_2 / 2 - h^2 [k_1, k_2] / 8) x,   x_4 = exp(h k_3) x,
        x_new = exp(h (k_1 + 2 k_2 + 2 k_3 + k_4) / 6 - h^2 [k_1, k_4] / 12) x.

    No error estimate.

    A step works through the action's ``frame(x, stages)`` (``manifolds.lie.Frame``): how it names
    the step's points and elements. ``LowRankSphereAction``'s frames do a step in coordinates with
    few small tensor operations (on CPU a small state's step costs about the count of operations);
    an action without ``frame`` gets the default, which calls its ``generator``, ``exp``, ``act``
    and ``bracket``.

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
        self._rk4 = _is_classic_rk4(tableau)

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
        k = frame.generator(frame.base, f(torch.tensor(t, dtype=x.dtype), x) if k_first is None else k_first)
        if self._rk4:
            theta = self._rk4_stages(f, t, x.dtype, h, frame, k)
        else:
            theta = self._stages(f, t, x.dtype, h, frame, k)
        return StepResult(manifold.projx(frame.point(frame.move(theta))))

    def _stages(self, f, t, dtype, h, frame, k1):
        """The algebra element of the step, ``h sum_i b_i dexpinv(theta_i, k_i)``."""
        tab = self.tableau
        ks = [k1]  # dexpinv-corrected generators
        for i in range(1, tab.stages):
            theta = _weighted_sum(ks, tab.a[i], h)
            xi = frame.move(theta)
            k = frame.generator(xi, f(torch.tensor(t + tab.c[i] * h, dtype=dtype), frame.point(xi)))
            ks.append(dexpinv(frame.bracket, theta, k, tab.order))
        return _weighted_sum(ks, tab.b, h)

    def _rk4_stages(self, f, t, dtype, h, frame, k1):
        """The step's algebra element in Munthe-Kaas and Owren's form (class docstring)."""
        def stage(c, theta):
            p = frame.move(theta)
            return frame.generator(p, f(torch.tensor(t + c * h, dtype=dtype), frame.point(p)))

        k2 = stage(0.5, k1 * (0.5 * h))
        k3 = stage(0.5, _weighted_sum([k2, frame.bracket(k1, k2)], (0.5, -0.125 * h), h))
        k4 = stage(1.0, k3 * h)
        return _weighted_sum([k1, k2, k3, k4, frame.bracket(k1, k4)], (1 / 6, 1 / 3, 1 / 3, 1 / 6, -h / 12), h)
