"""Base distributions for flows on manifolds: ``log_prob`` and ``sample``.

Densities are with respect to the manifold's Riemannian volume (on a sphere: its surface area; on the
Poincaré ball: ``lambda(x)^d dx``), the measure that ``solvers.divergence`` tracks. Each distribution
names its ``manifold``, which ``solvers.CNF`` checks against the flow's.
"""

from __future__ import annotations

import math

import geoopt
import torch

from .sphere import Sphere

__all__ = ["HaarSO3", "Mixture", "StandardNormal", "UniformSphere", "VonMisesFisher", "WrappedNormal"]


class StandardNormal:
    """The standard normal distribution on ``R^d``."""

    def __init__(self, d: int):
        self.d, self.manifold = d, geoopt.Euclidean(ndim=1)

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


class WrappedNormal:
    """The wrapped normal on the Poincaré ball of curvature ``-c``: a normal in the tangent space at ``mu``, exp-mapped.

    A draw is ``exp_mu(v)`` with ``v`` tangent at ``mu`` and, in an orthonormal frame of the ball's
    metric there, ``N(0, sigma^2 I_d)``: the ambient vector is ``u / lambda(mu)`` for ``u ~ N(0, sigma^2 I_d)``,
    ``lambda(x) = 2 / (1 - c |x|^2)``. With ``r = dist(mu, x)`` (the length of ``v``), the density
    with respect to the ball's volume is the normal's over the exp map's volume change, which in
    constant curvature ``-c`` depends on ``r`` only (Mathieu et al. 2019, Nagano et al. 2019)::

        log p(x) = -d/2 log(2 pi sigma^2) - r^2 / (2 sigma^2) - (d - 1) log(sinh(sqrt(c) r) / (sqrt(c) r)).

    Args:
        mu: the centre, a point of the ball of ``d`` entries.
        sigma: the standard deviation in the tangent space, > 0.
        c: the curvature's magnitude, > 0 (geoopt's ``PoincareBall(c)``).
    """

    def __init__(self, mu: torch.Tensor, sigma: float, c: float = 1.0):
        if mu.dim() != 1:
            raise ValueError(f"mu must be one point of the ball (a vector), got shape {tuple(mu.shape)}")
        if not (math.isfinite(sigma) and sigma > 0) or not (math.isfinite(c) and c > 0):
            raise ValueError(f"sigma and c must be positive and finite, got sigma={sigma}, c={c}")
        if not c * mu.pow(2).sum().item() < 1:
            raise ValueError(f"mu must lie inside the ball of radius 1/sqrt(c) = {c ** -0.5:.6g}, "
                             f"got |mu| = {mu.norm().item():.6g}")
        self.mu, self.sigma, self.c = mu, float(sigma), float(c)
        # The curvature in float64: geoopt keeps a float's in float32, and its sqrt would cost float64 points digits.
        self.d, self.manifold = mu.shape[0], geoopt.PoincareBall(c=torch.tensor(c, dtype=torch.float64))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_on(self.manifold, x, self.d)
        r = self.manifold.dist(self.mu.to(x), x)
        normal = -0.5 * self.d * math.log(2 * math.pi * self.sigma**2) - r.pow(2) / (2 * self.sigma**2)
        return normal - (self.d - 1) * _log_sinhc(math.sqrt(self.c) * r)

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        dtype = dtype or self.mu.dtype
        mu = self.mu.to(dtype)
        u = self.sigma * torch.randn(n, self.d, dtype=dtype, generator=generator)
        return self.manifold.expmap(mu.expand(n, -1), u / self.manifold.lambda_x(mu))


class Mixture:
    """A mixture ``sum_k w_k p_k`` of distributions on one manifold (e.g. of ``VonMisesFisher``).

    Args:
        components: distributions with ``log_prob``, ``sample`` and the same ``manifold`` (by kind and repr).
        weights: one non-negative weight per component, normalised here (default: equal).
    """

    def __init__(self, components: list, weights: list[float] | None = None):
        if not components:
            raise ValueError("a mixture needs at least one component")
        weights = [1.0] * len(components) if weights is None else list(weights)
        if len(weights) != len(components) or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one finite weight >= 0 per component ({len(components)}), not all zero; got {weights}")
        kinds = {repr(getattr(c, "manifold", None)) for c in components}
        if len(kinds) > 1:
            raise ValueError(f"the components of a mixture must live on one manifold, got {sorted(kinds)}")
        self.components, self.manifold = list(components), getattr(components[0], "manifold", None)
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        logs = torch.stack([c.log_prob(x) for c in self.components], -1)
        return torch.logsumexp(logs + self.weights.to(logs).log(), -1)

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        """``n`` draws in random order: the component of each drawn first, then the points per component."""
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        counts = torch.bincount(which, minlength=len(self.components)).tolist()
        points = torch.cat([c.sample(k, dtype=dtype, generator=generator) for c, k in zip(self.components, counts)])
        return points[torch.randperm(n, generator=generator)]


def _log_sinhc(s: torch.Tensor) -> torch.Tensor:
    """``log(sinh(s) / s)`` for ``s >= 0``, accurate at 0 (series) and for large ``s`` (no overflow)."""
    # Below 0.1 the series (next term s^8 / 37800 < 3e-13); above, the closed form loses no digits to cancellation.
    small = s < 0.1
    safe = torch.where(small, torch.ones_like(s), s)  # the unused branch must not make 0/0 or inf
    large = safe + torch.log1p(-torch.exp(-2 * safe)) - math.log(2) - torch.log(safe)
    s2 = s.pow(2)
    return torch.where(small, s2 / 6 - s2.pow(2) / 180 + s2.pow(3) / 2835, large)


def _check_shape(x: torch.Tensor, d: int) -> None:
    if x.shape[-1] != d:
        raise ValueError(f"points must have {d} coordinates, got shape {tuple(x.shape)}")


def _check_on(manifold, x: torch.Tensor, d: int) -> None:
    _check_shape(x, d)
    tol = 1e-5 if x.dtype == torch.float64 else 1e-3
    ok, reason = manifold.check_point_on_manifold(x.detach(), explain=True, atol=tol, rtol=tol)
    if not ok:
        raise ValueError(f"a density on {manifold!r} was asked at points off it: {reason}")
