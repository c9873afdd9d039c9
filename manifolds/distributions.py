"""Base distributions for flows on manifolds: ``log_prob`` and ``sample``.

Densities are with respect to the manifold's Riemannian volume (on a sphere: its surface area), the
measure that ``solvers.divergence`` tracks.
"""

from __future__ import annotations

import math

import torch

from .sphere import Sphere

__all__ = ["HaarSO3", "StandardNormal", "UniformSphere", "VonMisesFisher"]


class StandardNormal:
    """The standard normal distribution on ``R^d``."""

    def __init__(self, d: int):
        self.d = d

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.d)
        return -0.5 * x.pow(2).sum(-1) - 0.5 * self.d * math.log(2 * math.pi)

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        return torch.randn(n, self.d, dtype=dtype, generator=generator)


class UniformSphere:
    """The uniform distribution on the sphere ``{|x| = r}`` in ``R^d``: one over its area.

    Args:
        d: the ambient dimension (``S^{d-1}``).
        radius: the sphere's radius.
    """

    def __init__(self, d: int, radius: float = 1.0):
        self.d, self.manifold = d, Sphere(radius)
        # Area of the radius-r sphere in R^d: 2 pi^(d/2) r^(d-1) / Gamma(d/2).
        self.log_area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2) + (d - 1) * math.log(radius)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_on(self.manifold, x, self.d)
        return torch.full(x.shape[:-1], -self.log_area, dtype=x.dtype, device=x.device)

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        return self.manifold.projx(torch.randn(n, self.d, dtype=dtype, generator=generator))


class VonMisesFisher:
    """The von Mises-Fisher distribution on the unit sphere ``S^2``: density ``C(kappa) e^{kappa mu.x}``.

    ``C(kappa) = kappa / (4 pi sinh kappa)`` (the closed form in three dimensions; other dimensions
    need Bessel functions of arbitrary order, which torch lacks, and are refused). Sampling inverts
    the distribution of ``w = mu.x``, ``w = 1 + log(u + (1 - u) e^{-2 kappa}) / kappa``, and draws
    the direction orthogonal to ``mu`` uniformly.

    Args:
        mu: the mean direction, a unit vector of 3 entries.
        kappa: the concentration, > 0.
    """

    def __init__(self, mu: torch.Tensor, kappa: float):
        if mu.shape != (3,):
            raise ValueError(f"VonMisesFisher here is on S^2: mu must have 3 entries, got shape {tuple(mu.shape)}")
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be positive and finite, got {kappa}")
        self.mu, self.kappa, self.manifold = mu / mu.norm(), float(kappa), Sphere(1.0)
        # log C = log kappa - log 4 pi - log sinh kappa, with log sinh k = k + log(1 - e^{-2k}) - log 2.
        self.log_c = math.log(kappa) - math.log(2 * math.pi) - kappa - math.log1p(-math.exp(-2 * kappa))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_on(self.manifold, x, 3)
        return self.log_c + self.kappa * (x @ self.mu.to(x))

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        dtype = dtype or self.mu.dtype
        u = torch.rand(n, dtype=dtype, generator=generator)
        k = self.kappa
        w = 1 + torch.log(u + (1 - u) * math.exp(-2 * k)) / k  # mu.x, in [-1, 1]
        v = torch.randn(n, 3, dtype=dtype, generator=generator)
        mu = self.mu.to(dtype)
        v = v - (v @ mu)[:, None] * mu  # a direction orthogonal to mu
        v = v / v.norm(dim=-1, keepdim=True)
        return w[:, None] * mu + torch.sqrt((1 - w * w).clamp_min(0))[:, None] * v


class HaarSO3:
    """The uniform (Haar) distribution on SO(3), as ``manifolds.SpecialOrthogonal`` embeds it in R^{3x3}.

    The density is one over the volume in the metric the divergence uses, the Frobenius inner
    product of ``R^{3x3}``: a tangent ``R hat(w)`` has squared length ``2 |w|^2``, so the volume is
    ``(sqrt 2)^3`` times the ``8 pi^2`` of the unit-speed metric, ``16 sqrt(2) pi^2``. Samples are
    the QR factor of a Gaussian matrix with the signs fixed (Mezzadri 2007), its determinant made +1.
    """

    log_volume = math.log(16 * math.sqrt(2) * math.pi**2)

    def __init__(self):
        from .stiefel import SpecialOrthogonal

        self.manifold = SpecialOrthogonal()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (3, 3):
            raise ValueError(f"points of SO(3) are 3 x 3 matrices, got shape {tuple(x.shape)}")
        tol = 1e-5 if x.dtype == torch.float64 else 1e-3
        ok, reason = self.manifold.check_point_on_manifold(x.detach(), explain=True, atol=tol, rtol=tol)
        if not ok:
            raise ValueError(f"a density on SO(3) was asked at points off it: {reason}")
        return torch.full(x.shape[:-2], -self.log_volume, dtype=x.dtype, device=x.device)

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(n, 3, 3, dtype=dtype, generator=generator))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar on O(3)
        flip = torch.ones(n, 3, dtype=q.dtype)
        flip[:, -1] = torch.det(q)  # the reflections, to rotations: still Haar on SO(3)
        return q * flip.unsqueeze(-2)


def _check_shape(x: torch.Tensor, d: int) -> None:
    if x.shape[-1] != d:
        raise ValueError(f"points must have {d} coordinates, got shape {tuple(x.shape)}")


def _check_on(manifold, x: torch.Tensor, d: int) -> None:
    _check_shape(x, d)
    tol = 1e-5 if x.dtype == torch.float64 else 1e-3
    ok, reason = manifold.check_point_on_manifold(x.detach(), explain=True, atol=tol, rtol=tol)
    if not ok:
        raise ValueError(f"a density on {manifold!r} was asked at points off it: {reason}")
