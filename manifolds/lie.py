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
"""

from __future__ import annotations

import geoopt
import torch

from .sphere import Sphere

__all__ = ["SOnAction", "SphereAction", "StiefelAction", "bracket"]

# Bernoulli numbers B_0..B_4 in dexpinv(theta, k) = sum_j B_j / j! ad_theta^j (k).
_BERNOULLI_OVER_FACTORIAL = (1.0, -1.0 / 2.0, 1.0 / 12.0, 0.0, -1.0 / 720.0)


def bracket(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix commutator ``[a, b] = ab - ba`` over the last two dimensions."""
    return a @ b - b @ a


class SOnAction:
    """Shared algebra of SO(n): exponential and dexpinv. Subclasses define points and tangents."""

    manifold = None

    def exp(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(theta)

    def dexpinv(self, theta: torch.Tensor, k: torch.Tensor, order: int) -> torch.Tensor:
        """``dexp_theta^{-1}(k)`` truncated after the ``ad^j`` terms with ``j <= order - 2``.

        That truncation is enough for an RKMK method of the given order (Munthe-Kaas 1999).
        """
        out, ad = k, k
        for j in range(1, max(order - 1, 1)):
            ad = bracket(theta, ad)
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


class StiefelAction(SOnAction):
    """SO(n) acting on the Stiefel manifold ``{X in R^{n x p} : X^T X = I}`` by left product."""

    def __init__(self, manifold=None):
        self.manifold = geoopt.EuclideanStiefel() if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # For tangent U (X^T U skew): xi = U X^T - X U^T + X (U^T X) X^T is skew and xi X = U.
        u = self.manifold.proju(x, u)
        xt = x.transpose(-1, -2)
        ut = u.transpose(-1, -2)
        return u @ xt - x @ ut + x @ (ut @ x) @ xt

    def act(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return g @ x
