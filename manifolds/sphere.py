"""Spheres of any radius on geoopt's API, including the two a normalisation layer projects onto.

``Sphere(radius)`` extends ``geoopt.Sphere`` to radius ``r`` by scaling; the retraction stays
``projx(x + u)`` and ``expmap`` is the exact great-circle map. ``Sphere()`` is the unit sphere, as
``geoopt.Sphere()`` is.

``RMSSphere()`` (the same as ``Sphere(radius=None)``) has radius ``sqrt(d)`` for the last dimension
``d`` of the point: the sphere that RMSNorm projects onto. ``LayerNormSphere`` intersects that
sphere with the mean-zero hyperplane: the set LayerNorm (without its affine part) projects onto.

``eps`` reproduces the epsilon of a normalisation layer: ``projx(x) = x / sqrt(|x|^2 / r^2 + eps)``
(RMSNorm's formula). With ``eps > 0`` the projection lands at radius ``r * sqrt(1 - eps r^2/|x|^2)``,
slightly inside the sphere; keep ``eps = 0`` unless you must match a pretrained network.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F

__all__ = ["LayerNormSphere", "RMSSphere", "Sphere", "SphereExact"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _float32(x: torch.Tensor) -> torch.Tensor:
    # A norm summed in 16 bits loses the radius: normalise in float32, return in x's dtype.
    return x.float() if x.dtype in _LOW_PRECISION else x


class Sphere(geoopt.Sphere):
    """The sphere ``{x : |x| = r}``: the unit sphere by default, ``r = sqrt(d)`` when ``radius`` is None.

    Args:
        radius: the radius (default 1, geoopt's unit sphere), or None for ``sqrt(d)`` (the RMSNorm
            sphere, also spelt ``RMSSphere()``).
        eps: normalisation-layer epsilon inside ``projx`` (0 gives the exact projection).
    """

    name = "Sphere"

    def __init__(self, radius: float | None = 1.0, eps: float = 0.0):
        super().__init__()
        if radius is not None and not radius > 0:
            raise ValueError(f"Sphere radius must be positive, got {radius}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.radius = radius
        self.eps = eps

    def r(self, x: torch.Tensor) -> float:
        """The radius for points shaped like ``x``."""
        return math.sqrt(x.shape[-1]) if self.radius is None else self.radius

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        y = self._project_on_subspace(_float32(x))
        if self.radius is None:
            y = F.rms_norm(y, y.shape[-1:], eps=self.eps)  # fused, and RMSNorm to the bit
        else:
            y = y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) / self.radius**2 + self.eps)
        return y.to(x.dtype)

    def projx_affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``weight * projx(x) + bias`` (what ``AffineChart`` computes), fused where torch can."""
        return torch.addcmul(bias, self.projx(x), weight)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r = self.r(x)
        return super().proju(x / r, u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # Not geoopt's unit-sphere expmap on (x / r, u / r): for small u it falls back to
        # self.projx, which is ours (radius r), and the result would be scaled by r twice.
        r = self.r(x)
        angle = u.norm(dim=-1, keepdim=True) / r
        # sin(angle) / angle -> 1 as angle -> 0; the clamp keeps 0 / 0 out of values and gradients.
        safe = angle.clamp_min(torch.finfo(angle.dtype).tiny)
        return x * torch.cos(angle) + u * (torch.sin(safe) / safe)

    # logmap is geoopt's: it goes through our proju and dist, which already account for r.

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False) -> torch.Tensor:
        r = self.r(x)
        return super().dist(x / r, y / r, keepdim=keepdim) * r

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        # As geoopt's unit-sphere check on x / r (norms within atol + rtol of 1), saying which r.
        gap = (x.norm(dim=-1) / self.r(x) - 1).abs().max().item()
        if not gap <= atol + rtol:
            radius = f"sqrt(d) = {self.r(x):.6g}" if self.radius is None else f"{self.radius:g}"
            return False, f"`norm(x) != {radius}`: |norm(x) / r - 1| is up to {gap:.3g} (atol={atol}, rtol={rtol})"
        return True, None

    def random_uniform(self, *size, dtype=None, device=None) -> torch.Tensor:
        x = torch.randn(*size, dtype=dtype, device=device)
        return self.projx(x)

    random = random_uniform

    def extra_repr(self):
        radius = "sqrt(d)" if self.radius is None else f"{self.radius:g}"
        return f"radius={radius}, eps={self.eps:g}"


class SphereExact(Sphere):
    """``Sphere`` whose retraction is the exact exponential map (as ``geoopt.SphereExact``).

    ``retr(x, u)`` is ``expmap(x, proju(x, u))``: a Runge-Kutta step's increment has an O(h^2)
    normal part, which the exponential map alone would turn into a step off the sphere. Dropping
    that part caps Runge-Kutta methods at second order here; ``Sphere``'s projection keeps theirs.
    """

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.expmap(x, self.proju(x, u))


class RMSSphere(Sphere):
    """The sphere of radius ``sqrt(d)`` that RMSNorm without its gain projects onto.

    ``Sphere(radius=None)`` by its name; ``projx`` is ``F.rms_norm`` itself.

    Args:
        eps: RMSNorm's epsilon (0 gives the exact projection).
    """

    name = "RMSSphere"

    def __init__(self, eps: float = 0.0):
        super().__init__(radius=None, eps=eps)


class LayerNormSphere(Sphere):
    """The mean-zero sphere of radius ``sqrt(d)``: what LayerNorm without affine projects onto.

    ``projx`` is ``F.layer_norm`` itself (fused, and bit-compatible with the layer it stands for).

    Args:
        eps: LayerNorm's epsilon (0 gives the exact projection).
    """

    name = "LayerNormSphere"

    def __init__(self, eps: float = 0.0):
        super().__init__(radius=None, eps=eps)

    def _project_on_subspace(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(_float32(x), x.shape[-1:], eps=self.eps).to(x.dtype)

    def projx_affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            return super().projx_affine(x, weight, bias)
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps=self.eps)  # nn.LayerNorm exactly

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        mean = x.mean(-1).abs().max()
        if mean > atol * math.sqrt(x.shape[-1]):
            return False, f"`x` has non-zero mean {mean.item():.3g}"
        return super()._check_point_on_manifold(x, atol=atol, rtol=rtol)
