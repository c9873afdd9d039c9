"""The one stepping loop for every explicit Runge-Kutta tableau, on any geoopt manifold."""

from __future__ import annotations

from typing import Callable

import torch

from .base import StepResult
from .tableau import ButcherTableau

__all__ = ["RungeKutta", "combine", "interpolant"]

MODES = ("strict", "relaxed")


def combine(x: torch.Tensor | None, ks: list, weights, h: float) -> torch.Tensor:
    """``x + h * sum_j weights[j] * ks[j]`` skipping zero weights (``x`` None means 0)."""
    out = x
    for k, w in zip(ks, weights):
        if w:
            if out is None:
                out = k if h * w == 1.0 else k * (h * w)  # h = 1 is a Transformer's residual
            else:
                out = torch.add(out, k, alpha=h * w)
    return torch.zeros_like(ks[0]) if out is None else out


def interpolant(x, x1, k0, k1, h: float, x_mid=None) -> Callable[[float], torch.Tensor]:
    """The polynomial ``p(s)``, ``s`` in ``[0, 1]``, through ``x`` and ``x1`` with slopes ``h k0``
    and ``h k1``: cubic Hermite, or quartic through ``x_mid`` at ``s = 1/2`` when given (error
    ``O(h^5)`` with dopri5's continuous extension)."""
    d = h * k0
    r1, r2 = x1 - x - d, h * k1 - d
    if x_mid is None:
        c, b, a = 3 * r1 - r2, r2 - 2 * r1, None
    else:  # p(1) = x1, p'(1) = h k1, p(1/2) = x_mid: the inverse of [[1,1,1],[2,3,4],[1/4,1/8,1/16]]
        r3 = x_mid - x - d / 2
        c, b, a = -5 * r1 + r2 + 16 * r3, 14 * r1 - 3 * r2 - 32 * r3, -8 * r1 + 2 * r2 + 16 * r3

    def p(s: float) -> torch.Tensor:
        top = b if a is None else b + s * a
        return x + s * (d + s * (c + s * top))

    return p


class RungeKutta:
    """Explicit Runge-Kutta on a manifold: ambient stages, one retraction per step.

    Stage ``i`` evaluates the field at ``x + h sum_j a_ij k_j`` (in the ambient space, which keeps
    the tableau's order: retracting each stage would cost order on curved manifolds); the step
    ends with ``retr(x, h sum_i b_i k_i)``.

    Modes:
        strict: every field value is projected onto the tangent space where it was evaluated
            (``k = proju(x_i, f(t_i, x_i))``). The method keeps its order for the projected flow.
        relaxed: field values are used as they come, ``retr(x, h f(x))``: the Transformer's
            residual-then-normalise. It keeps the tableau's order when ``f`` is tangent (or its
            normal part vanishes); otherwise the normal part of ``f`` rescales the step and the
            result is first order in ``h`` for the projected flow -- a new architecture, not a
            more accurate integrator.

    With an embedded tableau the step also returns a local error estimate ``h sum (b - b_low) k``
    projected onto the tangent space at ``x``; an FSAL tableau also returns dense output, the
    ambient ``interpolant`` between the step's ends (quartic where the tableau has ``b_mid``).

    Args:
        tableau: the Butcher tableau.
        mode: "strict" or "relaxed".
    """

    def __init__(self, tableau: ButcherTableau, mode: str = "strict"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.tableau = tableau
        self.mode = mode

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def error_order(self) -> int | None:
        return self.tableau.error_order

    @property
    def fsal(self) -> bool:
        return self.tableau.fsal

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    def __repr__(self):
        return f"RungeKutta({self.tableau.name}, mode={self.mode!r})"

    def field_value(self, f: Callable, t, x, manifold):
        """The field value a stage uses: projected onto the tangent space in strict mode."""
        k = f(t, x)
        return manifold.proju(x, k) if self.mode == "strict" else k

    def step(self, f: Callable, t: float, x: torch.Tensor, h: float, manifold, k_first=None) -> StepResult:
        """Advance one step (the ``Solver`` contract).

        Args:
            f: the field ``f(t, x)`` (``t`` a 0-dim tensor).
            t: the step's start time.
            x: the state at ``t`` (on the manifold).
            h: the step size (negative integrates backwards).
            manifold: a geoopt manifold.
            k_first: the (projected) field at ``(t, x)`` if already known (FSAL).
        """
        tab = self.tableau
        ks = []
        x_new = None
        for i in range(tab.stages):
            ti = torch.tensor(t + tab.c[i] * h, dtype=x.dtype)
            if i == 0:
                ks.append(self.field_value(f, ti, x, manifold) if k_first is None else k_first)
                continue
            if tab.fsal and i == tab.stages - 1:
                x_new = manifold.retr(x, combine(None, ks, tab.b, h))
                ks.append(self.field_value(f, ti, x_new, manifold))
                continue
            ks.append(self.field_value(f, ti, combine(x, ks, tab.a[i], h), manifold))
        if x_new is None:
            x_new = manifold.retr(x, combine(None, ks, tab.b, h))
        error = None if tab.b_low is None else manifold.proju(x, combine(None, ks, tab.b_err, h))
        dense = None
        if tab.fsal and tab.b_low is not None:  # both ends' field values known: dense output is free
            x_mid = None if tab.b_mid is None else combine(x, ks, tab.b_mid, h)
            dense = interpolant(x, combine(x, ks, tab.b, h), ks[0], ks[-1], h, x_mid)
        return StepResult(x_new, error, ks[-1] if tab.fsal else None, dense)
