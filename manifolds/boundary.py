"""Where geoopt's Poincaré ball pins states without a word: the numerical boundary of a curved ball.

On a stereographic model of negative curvature ``k`` (``geoopt.PoincareBall``, ``Stereographic``
with ``k < 0`` and their ``Exact`` variants), geoopt's ``projx``, and with it ``retr`` and
``expmap``, clip every point to the radius ``(1 - eps) / sqrt(|k|)``. Here ``eps`` is 4e-3 in
float32 and 1e-5 otherwise (``geoopt.manifolds.stereographic.math._project``). A state the field
drives outward stops at that radius, still "on the manifold", and the solve goes on from a point
the ODE never reached. ``boundary_margin`` says how close the states are to that radius, and
``at_boundary`` whether any sits on it, so that the solve loop can raise or warn, naming the time
and the step.
"""

from __future__ import annotations

import geoopt
import torch

__all__ = ["at_boundary", "boundary_margin"]

_ROUNDING = 64  # a clipped point's norm is the clip radius to a few ulps: allow 64 of them


def boundary_margin(manifold: geoopt.Manifold, x: torch.Tensor) -> float | None:
    """The smallest ``(clip - |x|) / clip`` over the points of ``x``, or None without a boundary.

    ``clip`` is the radius geoopt's ``projx`` clips to. It is read off ``projx`` itself (a point
    far outside lands on it), not copied, so it follows geoopt's ``eps`` for the dtype. Points of
    a ``geoopt.ProductManifold`` count through the components that have a boundary. The margin is
    0 (to rounding) for a pinned point and 1 at the centre.
    """
    if isinstance(manifold, geoopt.ProductManifold):
        margins = [boundary_margin(m, manifold.take_submanifold_value(x, i)) for i, m in enumerate(manifold.manifolds)]
        return min((m for m in margins if m is not None), default=None)
    if not isinstance(manifold, geoopt.Stereographic) or not bool((manifold.k < 0).all()):
        return None
    with torch.no_grad():
        far = torch.ones_like(x) * (2 * manifold.radius).to(x)  # norm 2 sqrt(d) / sqrt(|k|): outside
        clip = manifold.projx(far).norm(dim=-1)
        return ((clip - x.norm(dim=-1)) / clip).min().item()


def at_boundary(manifold: geoopt.Manifold, x: torch.Tensor) -> bool:
    """Whether any point of ``x`` sits on the clip radius (within rounding): pinned there by ``projx``.

    False for manifolds without such a boundary.
    """
    margin = boundary_margin(manifold, x)
    return margin is not None and margin <= _ROUNDING * torch.finfo(x.dtype).eps
