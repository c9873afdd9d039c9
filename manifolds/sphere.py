"""Spheres of any radius on geoopt's API, including the two a normalisation layer projects onto.

``Sphere(radius)`` extends ``geoopt.Sphere`` (the unit sphere) to radius ``r`` by scaling; the
retraction stays ``projx(x + u)`` and ``expmap`` is the exact great-circle map.

With ``radius=None`` the radius is ``sqrt(d)`` for the last dimension ``d`` of the point: the
sphere that RMSNorm projects onto. ``LayerNormSphere`` intersects that sphere with the mean-zero
hyperplane: the set LayerNorm (without its affine part) projects onto.

``eps`` reproduces the epsilon of a normalisation layer: ``projx(x) = x / sqrt(|x|^2 / r^2 + eps)``
(RMSNorm's formula). With ``eps > 0`` the projection lands at radius ``r * sqrt(1 - eps r^2/|x|^2)``,
slightly inside the sphere; keep ``eps = 0`` unless you must match a pretrained network.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F

__all__ = ["Sphere", "SphereExact", "LayerNormSphere"]


class Sphere(geoopt.Sphere):
    """The sphere ``{x : |x| = r}`` (``r = sqrt(d)`` when ``radius`` is None).

    Args:
        radius: the radius, or None for ``sqrt(d)`` (the RMSNorm sphere).
        eps: normalisation-layer epsilon inside ``projx`` (0 gives the exact projection).
    """

    name = "Sphere"

    def __init__(self, radius: float | None = None, eps: float = 0.0):
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
        x = self._project_on_subspace(x)
        if self.radius is None:
            return F.rms_norm(x, x.shape[-1:], eps=self.eps)  # fused, and RMSNorm to the bit
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.radius**2 + self.eps)

    def projx_affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``weight * projx(x) + bias`` (what ``AffineChart`` computes), fused where torch can."""
        return torch.addcmul(bias, self.projx(x), weight)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r = self.r(x)
        return super().proju(x / r, u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r = self.r(x)
        return super().expmap(x / r, u / r) * r

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = self.r(x)
        return super().logmap(x / r, y / r) * r

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False) -> torch.Tensor:
        r = self.r(x)
        return super().dist(x / r, y / r, keepdim=keepdim) * r

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        return super()._check_point_on_manifold(x / self.r(x), atol=atol, rtol=rtol)

    def random_uniform(self, *size, dtype=None, device=None) -> torch.Tensor:
        x = torch.randn(*size, dtype=dtype, device=device)
        return self.projx(x)

    random = random_uniform

    def extra_repr(self):
        radius = "sqrt(d)" if self.radius is None else f"{self.radius:g}"
        return f"radius={radius}, eps={self.eps:g}"


class SphereExact(Sphere):
    """``Sphere`` whose retraction is the exact exponential map (as ``geoopt.SphereExact``)."""

    retr = Sphere.expmap


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
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def projx_affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps=self.eps)  # nn.LayerNorm exactly

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        mean = x.mean(-1).abs().max()
        if mean > atol * math.sqrt(x.shape[-1]):
            return False, f"`x` has non-zero mean {mean.item():.3g}"
        return super()._check_point_on_manifold(x, atol=atol, rtol=rtol)
