"""The divergence of a vector field on a manifold: what a continuous normalising flow integrates.

Along a flow ``x' = F(t, x)`` the log-volume of the flow map changes at the rate ``div F(x)``, the
Riemannian divergence. For a manifold embedded isometrically in ``R^n`` (spheres, Stiefel, SO(n),
Euclidean space, products of these) and ``F`` tangent (strict mode's ``proju(x, f(x))``),

    div F(x) = tr(P DF P) = sum_j (P e_j)^T DF (P e_j),

with ``P`` the orthogonal projection onto the tangent space at ``x``: the trace of the Jacobian
restricted to the tangent space. On the Poincaré ball (curvature ``-c``), whose metric is the
Euclidean one scaled by ``lambda(x)^2``, ``lambda = 2 / (1 - c |x|^2)``, the volume element
``lambda^d`` adds ``d F . grad log lambda = 2 c d (F . x) / (1 - c |x|^2)``.

``method="exact"`` takes one vector-Jacobian product per ambient coordinate; ``"hutchinson"`` one
per noise draw, ``E[(P e)^T DF (P e)]`` over Gaussian or Rademacher ``e`` (unbiased, since
``E[e e^T] = I``). Both are differentiable (``create_graph``) and batched over the points of ``x``.
"""

from __future__ import annotations

import math
from typing import Callable

import geoopt
import torch

__all__ = ["DIVERGENCE_METHODS", "divergence"]

DIVERGENCE_METHODS = ("exact", "hutchinson")
_NOISES = ("gaussian", "rademacher")


def _point_ndim(manifold) -> int:
    return max(getattr(manifold, "ndim", 0), 1)


def _supported(manifold) -> None:
    parts = manifold.manifolds if isinstance(manifold, geoopt.ProductManifold) else [manifold]
    for part in parts:
        ball = isinstance(part, geoopt.Stereographic) and bool((part.k < 0).all())
        if isinstance(part, (geoopt.Lorentz, geoopt.SymmetricPositiveDefinite)) or (
            isinstance(part, geoopt.Stereographic) and not ball
        ) or (ball and isinstance(manifold, geoopt.ProductManifold)):
            raise ValueError(
                f"divergence is not offered on {type(part).__name__} here (its metric is not the ambient one "
                f"or a conformal ball's); supported: Euclidean, spheres, Stiefel, SO(n), the Poincaré ball, and "
                f"products of the isometrically embedded ones"
            )


def divergence(
    f: Callable, t, x: torch.Tensor, manifold=None, *, method: str = "exact", noise: str = "gaussian",
    samples: int = 1, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``div F(x)`` for the tangent field ``F(t, x) = proju(x, f(t, x))``, one value per point.

    Args:
        f: the field ``f(t, x)`` (projected onto the tangent space here).
        t: the time.
        x: points on ``manifold``, shape ``(*batch, *point_shape)``.
        manifold: a geoopt manifold (default Euclidean with 1-D points).
        method: "exact" or "hutchinson".
        noise: "gaussian" or "rademacher" (Hutchinson).
        samples: noise draws averaged (Hutchinson).
        generator: for the noise (Hutchinson).

    Returns:
        ``(*batch,)``, differentiable in ``x`` and in the field's parameters.
    """
    manifold = geoopt.Euclidean(ndim=1) if manifold is None else manifold
    if method not in DIVERGENCE_METHODS:
        raise ValueError(f"unknown divergence method {method!r}; expected one of {DIVERGENCE_METHODS}")
    if noise not in _NOISES:
        raise ValueError(f"unknown noise {noise!r}; expected one of {_NOISES}")
    _supported(manifold)
    nd = _point_ndim(manifold)
    event = x.shape[x.dim() - nd:]
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        value = manifold.proju(x, f(t, x))

        def quad(v):  # v^T DF v, per point, v tangent
            (vjp,) = torch.autograd.grad(value, x, v, create_graph=True, retain_graph=True)
            return (vjp * v).flatten(x.dim() - nd).sum(-1)

        if method == "exact":
            total = 0.0
            for j in range(math.prod(event)):
                e = torch.zeros(event.numel(), dtype=x.dtype, device=x.device)
                e[j] = 1.0
                total = total + quad(manifold.proju(x, e.view(event).expand_as(x)))
        else:
            total = 0.0
            for _ in range(samples):
                e = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                if noise == "rademacher":
                    e = torch.sign(e)
                total = total + quad(manifold.proju(x, e))
            total = total / samples
        if isinstance(manifold, geoopt.Stereographic):  # the Poincaré ball's conformal volume element
            c = -manifold.k.to(x)
            d = event.numel()
            total = total + 2 * c * d * (value * x).sum(-1) / (1 - c * x.pow(2).sum(-1))
    return total
