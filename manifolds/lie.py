"""The action of the rotation group SO(n) on the sphere and on the Stiefel manifold.

Lie-group integrators (Runge-Kutta-Munthe-Kaas) move a point ``x`` by ``exp(theta) x`` with
``theta`` in the Lie algebra so(n) of skew-symmetric matrices, so the state never leaves the
manifold. An action supplies the vocabulary they need:

- ``generator(x, u)``: a skew ``xi`` with ``xi x = proju(x, u)`` (a tangent vector as an algebra
  element);
- ``exp(theta)``: the group exponential (the matrix exponential);
- ``act(g, x)``: apply a group element to a point;
- ``dexpinv(theta, k, order)``: the inverse derivative of ``exp``, truncated after the Bernoulli
  terms an integrator of the given order needs.

The action decides how algebra elements are stored: ``SphereAction`` and ``StiefelAction`` use
dense ``n x n`` matrices (O(n^3) per token); ``LowRankSphereAction`` keeps them factored through
the few vectors an RKMK step has seen (O(n) per token for a given number of stages), with the same
results. An element only needs ``+`` and multiplication by a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .sphere import Sphere
from .stiefel import Stiefel

__all__ = ["LowRankSkew", "LowRankSphereAction", "SOnAction", "SphereAction", "StiefelAction", "bracket"]

# Bernoulli numbers B_0..B_4 in dexpinv(theta, k) = sum_j B_j / j! ad_theta^j (k).
_BERNOULLI_OVER_FACTORIAL = (1.0, -1.0 / 2.0, 1.0 / 12.0, 0.0, -1.0 / 720.0)


def bracket(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix commutator ``[a, b] = ab - ba`` over the last two dimensions."""
    return a @ b - b @ a


class SOnAction:
    """Shared algebra of SO(n): bracket, exponential and dexpinv on dense matrices (``dexpinv`` needs
    only ``bracket``, ``+`` and ``*``, so it serves any representation). Subclasses define points
    and tangents."""

    manifold = None
    bracket = staticmethod(bracket)

    def exp(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(theta)

    def dexpinv(self, theta: torch.Tensor, k: torch.Tensor, order: int) -> torch.Tensor:
        """``dexp_theta^{-1}(k)`` truncated after the ``ad^j`` terms with ``j <= order - 2``.

        That truncation is enough for an RKMK method of the given order (Munthe-Kaas 1999).
        """
        out, ad = k, k
        for j in range(1, max(order - 1, 1)):
            ad = self.bracket(theta, ad)
            if _BERNOULLI_OVER_FACTORIAL[j]:
                out = out + _BERNOULLI_OVER_FACTORIAL[j] * ad
        return out


class SphereAction(SOnAction):
    """SO(n) acting on the sphere of ``Sphere(radius)`` by matrix-vector product.

    Points have shape ``(..., n)``; algebra elements ``(..., n, n)``.
    """

    def __init__(self, manifold: Sphere | None = None):
        self.manifold = Sphere(1.0) if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # xi = (u x^T - x u^T) / r^2 gives xi x = u - x (x.u) / r^2 = proju(x, u).
        r2 = x.pow(2).sum(-1, keepdim=True).unsqueeze(-1)  # (..., 1, 1)
        outer = u.unsqueeze(-1) * x.unsqueeze(-2)  # (..., n, n)
        return (outer - outer.transpose(-1, -2)) / r2

    def act(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (g @ x.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LowRankSkew:
    """The skew matrix ``theta = P S P^T``, kept factored: ``P`` ``(..., n, k)`` has the ``columns``.

    ``S`` ``(..., k, k)`` is skew; ``P`` need not be orthonormal or even of full rank (an RKMK
    step's stage points are combinations of its earlier vectors), so nothing divides by a norm.
    Sums and brackets match columns by identity: the elements of one RKMK step share their
    columns, which keeps ``k`` at most 2 per stage (a field value and the point it was taken at)
    instead of growing with every concatenation. Sharing only saves work: a column that appears
    twice is still exact.
    """

    columns: tuple[torch.Tensor, ...]  # each (..., n)
    S: torch.Tensor  # (..., k, k)

    def __mul__(self, c: float) -> LowRankSkew:
        return LowRankSkew(self.columns, c * self.S)

    __rmul__ = __mul__

    def __add__(self, other: LowRankSkew) -> LowRankSkew:
        columns, (a, b) = _common(self, other)
        return LowRankSkew(columns, a + b)

    def dense(self) -> torch.Tensor:
        """The ``(..., n, n)`` matrix (for tests and the dense reference)."""
        pt = _rows(self.columns)
        return pt.transpose(-1, -2) @ self.S @ pt


def _rows(columns: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``P^T`` ``(..., k, n)``: stacked as rows, a contiguous copy of each column."""
    return torch.stack(columns, -2)


def _common(*elements: LowRankSkew) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """The union of the elements' columns (by identity), and each ``S`` written in that basis."""
    index = {}  # id(column) -> position
    columns = []
    # Widest first: an RKMK step's narrower elements are then contiguous blocks of the union.
    for e in sorted(elements, key=lambda e: -len(e.columns)):
        for c in e.columns:
            if id(c) not in index:
                index[id(c)] = len(columns)
                columns.append(c)
    k, out = len(columns), []
    for e in elements:
        positions = [index[id(c)] for c in e.columns]
        before, after = positions[0], k - positions[0] - len(positions)
        if positions == list(range(before, before + len(positions))):  # a block: zero-pad around it
            out.append(F.pad(e.S, (before, after, before, after)) if len(positions) < k else e.S)
        else:  # S_union = E^T S E with E the one-hot (k_e, k) map; a repeated column sums
            select = F.one_hot(torch.tensor(positions), k).to(e.S)
            out.append(select.transpose(0, 1) @ e.S @ select)
    return tuple(columns), out


_J = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # u x^T - x u^T = [u x] J [u x]^T


class _LowRankRotation(NamedTuple):
    """``exp(theta)``, applied lazily: acting on one point needs a smaller exponential."""

    theta: LowRankSkew


class LowRankSphereAction(SOnAction):
    """``SphereAction`` with algebra elements stored as ``LowRankSkew``: exact, and O(n) per token.

    Every element an RKMK step builds lies in so(n) restricted to the span of the step's points
    and field values, so with ``G = P^T P`` (``k x k``):

    - ``generator(x, u)`` is ``(u x^T - x u^T) / r^2``: columns ``(u, x)``;
    - ``[P S1 P^T, P S2 P^T] = P (S1 G S2 - S2 G S1) P^T``;
    - ``exp(P S P^T) x = x + P phi(S G) S P^T x`` with ``phi(z) = (e^z - 1) / z``, read off the
      last column of ``expm([[S G, S P^T x], [0, 0]])`` (a ``(k + 1) x (k + 1)`` exponential, no
      inverse); ``exp`` only records ``theta`` and ``act`` does this.

    Points have shape ``(..., n)``. Matches ``SphereAction`` to rounding.
    """

    def __init__(self, manifold: Sphere | None = None):
        self.manifold = Sphere(1.0) if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> LowRankSkew:
        r2 = x.pow(2).sum(-1)[..., None, None]  # (..., 1, 1)
        return LowRankSkew((u, x), _J.to(x) / r2)  # S (..., 2, 2)

    @staticmethod
    def bracket(a: LowRankSkew, b: LowRankSkew) -> LowRankSkew:
        columns, (sa, sb) = _common(a, b)
        pt = _rows(columns)
        sgs = sa @ (pt @ pt.transpose(-1, -2)) @ sb  # (..., k, k); its transpose is sb G sa
        return LowRankSkew(columns, sgs - sgs.transpose(-1, -2))

    def exp(self, theta: LowRankSkew) -> _LowRankRotation:
        return _LowRankRotation(theta)

    def act(self, g: _LowRankRotation, x: torch.Tensor) -> torch.Tensor:
        # Products with one vector are broadcast sums: a batched matmul with an inner or outer
        # dimension of 1 is slow on CPU, above all in the backward pass.
        pt, s = _rows(g.theta.columns), g.theta.S
        k = s.shape[-1]
        ptx = (pt * x.unsqueeze(-2)).sum(-1, keepdim=True)  # (..., k, 1): P^T x
        top = s @ torch.cat([pt @ pt.transpose(-1, -2), ptx], -1)  # (..., k, k + 1): [S G, S P^T x]
        block = torch.cat([top, torch.zeros_like(top[..., :1, :])], -2)  # (..., k + 1, k + 1)
        w = torch.linalg.matrix_exp(block)[..., :k, k:]  # (..., k, 1): phi(S G) S P^T x
        return x + (w * pt).sum(-2)


class StiefelAction(SOnAction):
    """SO(n) acting on the Stiefel manifold ``{X in R^{n x p} : X^T X = I}`` by left product.

    Works for ``manifolds.Stiefel`` and ``manifolds.SpecialOrthogonal`` (``p = n``), the default
    being ``Stiefel()``. The generator does not call the manifold's ``proju``: it moves ``X`` by the
    orthogonal projection of ``U`` onto the tangent space, which is what ``Stiefel.proju`` returns
    (geoopt's canonical ``Stiefel.proju`` is not that projection, and would give a wrong ``xi``).
    """

    def __init__(self, manifold=None):
        self.manifold = Stiefel() if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # xi = U X^T - X U^T - X skew(X^T U) X^T: each term is skew, so xi is for any U; with
        # X^T X = I, xi X = U - X sym(X^T U), the tangent part of U (U itself when U is tangent).
        xt = x.transpose(-1, -2)
        a = u @ xt
        xax = x @ (xt @ u - u.transpose(-1, -2) @ x) @ xt / 2
        return a - a.transpose(-1, -2) - xax

    def act(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return g @ x
