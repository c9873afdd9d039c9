"""Riemannian flow matching (Chen & Lipman 2023) on geodesic paths: the conditional path, its velocity, the loss.

A pair ``x0`` (from the base) and ``x1`` (from the data) defines the geodesic

    x_t = exp_{x0}(t log_{x0}(x1)),    t in [0, 1],

and its velocity ``u_t = d/dt x_t``, a tangent vector at ``x_t``. Regressing a field on it,

    loss = E_{t, x0, x1} |proju(x_t, f(t, x_t)) - u_t|^2_{g(x_t)}

(the squared length in the manifold's metric, ``manifold.inner``), gives a field whose flow from
the base at ``t = 0`` reaches the data's distribution at ``t = 1``; ``FlowMatching.cnf()`` then
samples it and evaluates exact log-likelihoods with ``solvers.CNF`` (any method, adaptive steps, the
adjoint). The velocity is the exact derivative of the exp map along the path (autograd), not the
finite difference or the ``log_{x_t}(x1) / (1 - t)`` form that degrades as ``t -> 1``.

The exp and log maps are the manifold's own (``expmap``/``logmap``); ``manifolds.SpecialOrthogonal``
of 3 x 3 matrices, which has no ``logmap``, gets the closed-form rotation logarithm here. A manifold
without a logarithm is refused.
"""

from __future__ import annotations

from typing import Callable

import geoopt
import torch
from torch import nn

from manifolds import SpecialOrthogonal

from .cnf import CNF, _check_base

__all__ = ["FlowMatching", "conditional_velocity", "flow_matching_loss", "geodesic", "geodesic_maps", "squared_norm"]


def geodesic_maps(manifold) -> tuple[Callable, Callable]:
    """``(exp, log)``: ``exp(x, u)`` and ``log(x, y)`` of ``manifold``; ``ValueError`` if it has no logarithm
    (``SpecialOrthogonal`` of other than 3 x 3 matrices: at the first call of ``log``)."""
    if isinstance(manifold, SpecialOrthogonal):
        return manifold.expmap, _so3_log
    parts = manifold.manifolds if isinstance(manifold, geoopt.ProductManifold) else [manifold]
    for part in parts:
        if type(part).logmap is geoopt.Manifold.logmap or type(part).expmap is geoopt.Manifold.expmap:
            raise ValueError(f"flow matching needs the exp and log maps of {part!r}, which it does not have "
                             f"(geodesic paths; supported e.g.: spheres, SO(3), the Poincaré ball, Euclidean space)")
    return manifold.expmap, manifold.logmap


def _so3_log(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log_x(y)`` on SO(3) in the bi-invariant metric: ``x Omega`` with ``exp(Omega) = x^T y``, ``Omega`` skew.

    ``x^T y`` is a rotation by ``theta`` about ``a``: its skew part is ``sin(theta) hat(a)``, its
    trace ``1 + 2 cos(theta)``, so ``Omega = theta / sin(theta)`` times the skew part, ``theta``
    from ``atan2`` (accurate at every angle; at ``theta = pi``, the cut locus, the axis is lost).
    """
    if x.shape[-2:] != (3, 3):
        raise ValueError(f"the rotation logarithm here is SO(3)'s: points must be 3 x 3, got shape {tuple(x.shape)}")
    r = x.transpose(-1, -2) @ y
    skew = (r - r.transpose(-1, -2)) / 2
    sin = skew.pow(2).sum((-1, -2)).div(2).sqrt()  # |hat(a)|_F = sqrt(2) |a|
    cos = (torch.diagonal(r, dim1=-2, dim2=-1).sum(-1) - 1) / 2
    theta = torch.atan2(sin, cos)
    small = sin < 1e-4  # theta / sin(theta) = 1 + theta^2 / 6 + O(theta^4) there (and no 0 / 0)
    factor = torch.where(small, 1 + theta.pow(2) / 6, theta / torch.where(small, torch.ones_like(sin), sin))
    return x @ (factor[..., None, None] * skew)


def _per_point(t: torch.Tensor, x: torch.Tensor, manifold) -> torch.Tensor:
    """``t`` of shape ``(B,)`` shaped to broadcast against points ``x`` of shape ``(B, *point_shape)``."""
    nd = max(getattr(manifold, "ndim", 0), 1)
    if t.shape != x.shape[: x.dim() - nd]:
        raise ValueError(f"need one time per point: t has shape {tuple(t.shape)}, points {tuple(x.shape)}")
    return t.reshape(*t.shape, *([1] * nd))


def geodesic(manifold, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = exp_{x0}(t log_{x0}(x1))``, one ``t`` per pair (shape ``(B,)``)."""
    exp, log = geodesic_maps(manifold)
    return exp(x0, _per_point(t, x0, manifold) * log(x0, x1))


def conditional_velocity(manifold, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
    """``(x_t, u_t)``: the geodesic's point at ``t`` and its velocity there, both detached (they are targets).

    ``u_t`` is ``d/dt exp_{x0}(t v)``, ``v = log_{x0}(x1)``: a Jacobian-vector product taken by
    differentiating twice (``J^T w``, then its gradient in ``w`` is ``J``), which works through any
    op with a backward, geoopt's scripted ones included. Each point's time is its own, so one pass
    gives every point's derivative.
    """
    exp, log = geodesic_maps(manifold)
    with torch.enable_grad():
        v = log(x0.detach(), x1.detach())
        tt = t.detach().to(x0.dtype).requires_grad_(True)
        xt = exp(x0.detach(), _per_point(tt, x0, manifold) * v)
        w = torch.zeros_like(xt, requires_grad=True)
        (jtw,) = torch.autograd.grad(xt, tt, w, create_graph=True)
        (ut,) = torch.autograd.grad(jtw, w, torch.ones_like(jtw), allow_unused=True, materialize_grads=True)
    return xt.detach(), ut.detach()


def squared_norm(manifold, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``|u|^2`` in the metric at ``x``, one value per point (``keepdim`` and a reshape: geoopt's Poincaré
    ball broadcasts its ``inner`` wrongly without it)."""
    nd = max(getattr(manifold, "ndim", 0), 1)
    return manifold.inner(x, u, u, keepdim=True).reshape(x.shape[: x.dim() - nd])


def flow_matching_loss(field: Callable, manifold, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mean over the pairs of ``|proju(x_t, field(t, x_t)) - u_t|^2`` in the metric at ``x_t``.

    Args:
        field: ``field(t, x)`` with ``t`` of shape ``(B,)`` (one time per point).
        manifold: where the points live (``geodesic_maps`` says which are supported).
        x0, x1: the pairs, ``(B, *point_shape)`` each.
        t: times in ``[0, 1]``, ``(B,)``.
    """
    xt, ut = conditional_velocity(manifold, x0, x1, t)
    residual = manifold.proju(xt, field(t, xt)) - ut
    loss = squared_norm(manifold, xt, residual).mean()
    if not torch.isfinite(loss):
        raise ValueError(f"the flow-matching loss is {loss.item()}: a non-finite field value or pair "
                         f"(points at each other's cut locus, or off the manifold)")
    return loss


class FlowMatching(nn.Module):
    """A field trained by Riemannian flow matching from ``base`` (``t = 0``) to the data (``t = 1``).

    Args:
        field: the network ``field(t, x)``; ``t`` is a scalar when solved, one time per point in the loss.
        manifold: where the points live (refused if ``geodesic_maps`` is).
        base: the distribution at ``t = 0`` (``manifolds.distributions``), on ``manifold``.
    """

    def __init__(self, field: nn.Module, manifold, base):
        super().__init__()
        geodesic_maps(manifold)
        _check_base(base, manifold)
        self.field, self.manifold, self.base = field, manifold, base

    def loss(self, x1: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``flow_matching_loss`` on the data ``x1`` paired with fresh base draws, at uniform times."""
        x0 = self.base.sample(len(x1), dtype=x1.dtype, generator=generator).to(x1.device)
        t = torch.rand(len(x1), dtype=x1.dtype, generator=generator).to(x1.device)
        return flow_matching_loss(self.field, self.manifold, x0, x1, t)

    def cnf(self, **kwargs) -> CNF:
        """The flow as a ``CNF`` over ``[0, 1]`` (``kwargs``: its ``method``, ``options``, ``divergence_method``)."""
        return CNF(self.field, self.manifold, self.base, horizon=1.0, **kwargs)
