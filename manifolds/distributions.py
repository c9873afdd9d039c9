"""Base distributions for flows on manifolds: ``log_prob`` and ``sample``.

Densities are with respect to the manifold's Riemannian volume (on a sphere: its surface area; on the
Poincaré ball: ``lambda(x)^d dx``; on a product: the product of the factors'), the measure that
``solvers.divergence`` tracks. Each distribution names its ``manifold``, which ``solvers.CNF``
checks against the flow's.
"""

from __future__ import annotations

import math

import geoopt
import torch

from .sphere import Sphere

__all__ = ["HaarSO3", "Mixture", "Product", "StandardNormal", "UniformSphere", "VonMisesFisher", "WrappedNormal"]


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
    """The von Mises-Fisher distribution on the unit circle ``S^1`` or sphere ``S^2``: density ``C e^{kappa mu.x}``.

    On ``S^2``, ``C(kappa) = kappa / (4 pi sinh kappa)``; on ``S^1`` (the von Mises distribution of
    the angle, with respect to arc length) ``C(kappa) = 1 / (2 pi I_0(kappa))``. Other dimensions
    need Bessel functions of arbitrary order, which torch lacks, and are refused. Sampling on ``S^2``
    inverts the distribution of ``w = mu.x``, ``w = 1 + log(u + (1 - u) e^{-2 kappa}) / kappa``, and
    draws the direction orthogonal to ``mu`` uniformly; on ``S^1`` it draws the angle from ``mu``
    by Best and Fisher's (1979) rejection from a wrapped Cauchy envelope.

    Args:
        mu: the mean direction, a unit vector of 2 (``S^1``) or 3 (``S^2``) entries.
        kappa: the concentration, > 0.
    """

    def __init__(self, mu: torch.Tensor, kappa: float):
        if mu.shape not in ((2,), (3,)):
            raise ValueError(f"VonMisesFisher here is on S^1 or S^2: mu must have 2 or 3 entries, "
                             f"got shape {tuple(mu.shape)}")
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be positive and finite, got {kappa}")
        self.mu, self.kappa, self.manifold = mu / mu.norm(), float(kappa), Sphere(1.0)
        self.d = mu.shape[0]
        if self.d == 3:
            # log C = log kappa - log 4 pi - log sinh kappa, with log sinh k = k + log(1 - e^{-2k}) - log 2.
            self.log_c = math.log(kappa) - math.log(2 * math.pi) - kappa - math.log1p(-math.exp(-2 * kappa))
        else:
            # log I_0(k) = log(i0e(k)) + k: the scaled Bessel function does not overflow for large k.
            log_i0 = math.log(torch.special.i0e(torch.tensor(kappa, dtype=torch.float64)).item()) + kappa
            self.log_c = -math.log(2 * math.pi) - log_i0

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_on(self.manifold, x, self.d)
        return self.log_c + self.kappa * (x @ self.mu.to(x))

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        dtype = dtype or self.mu.dtype
        mu = self.mu.to(dtype)
        if self.d == 2:
            angle = _von_mises_angles(n, self.kappa, dtype, generator)
            return angle.cos()[:, None] * mu + angle.sin()[:, None] * torch.stack([-mu[1], mu[0]])
        u = torch.rand(n, dtype=dtype, generator=generator)
        k = self.kappa
        w = 1 + torch.log(u + (1 - u) * math.exp(-2 * k)) / k  # mu.x, in [-1, 1]
        v = torch.randn(n, 3, dtype=dtype, generator=generator)
        v = v - (v @ mu)[:, None] * mu  # a direction orthogonal to mu
        v = v / v.norm(dim=-1, keepdim=True)
        return w[:, None] * mu + torch.sqrt((1 - w * w).clamp_min(0))[:, None] * v


def _von_mises_angles(n: int, kappa: float, dtype, generator) -> torch.Tensor:
    """``n`` angles in ``[-pi, pi]`` of density ``e^{kappa cos theta} / (2 pi I_0(kappa))`` (Best and Fisher 1979).

    Proposals ``f = cos theta`` come from a wrapped Cauchy envelope of parameter ``rho``; the test
    ``c (2 - c) > u`` accepts most of them cheaply, ``log(c / u) + 1 - c >= 0`` is the exact one.
    Rounds of proposals repeat until ``n`` are accepted (at every ``kappa`` at least 0.65 of them are).
    """
    # rho = (tau - sqrt(2 tau)) / (2 kappa), tau = 1 + sqrt(1 + 4 kappa^2), rewritten without the
    # cancellation of tau - sqrt(2 tau) as kappa -> 0 (where rho ~ kappa / 2).
    root = math.sqrt(1 + 4 * kappa**2)
    tau = 1 + root
    rho = 2 * kappa * tau / ((root + 1) * (tau + math.sqrt(2 * tau)))
    r = (1 + rho**2) / (2 * rho)
    angles, count = [], 0
    while count < n:
        m = 2 * (n - count) + 16  # enough for one round, usually
        u1, u2, u3 = torch.rand(3, m, dtype=torch.float64, generator=generator)
        z = torch.cos(math.pi * u1)
        f = (1 + r * z) / (r + z)
        c = kappa * (r - f)
        accept = (c * (2 - c) > u2) | (torch.log(c / u2) + 1 - c >= 0)
        theta = torch.sign(u3 - 0.5) * torch.acos(f.clamp(-1, 1))
        angles.append(theta[accept])
        count += int(accept.sum())
    return torch.cat(angles)[:n].to(dtype)


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


class Product:
    """Independent distributions on the factors of a product manifold: ``p(x) = prod_i p_i(x_i)``.

    A point is the concatenation of one point of each factor (vectors only), and the manifold is
    ``geoopt.ProductManifold`` of the factors' manifolds, whose volume is the product of theirs: so
    the log-density is the sum of the factors'. The flat torus ``T^2`` is the product of two unit
    circles: ``Product([UniformSphere(2), UniformSphere(2)])`` is uniform on it (density ``1 / (2 pi)^2``
    in the angles), ``Product([VonMisesFisher(mu1, k1), VonMisesFisher(mu2, k2)])`` a product of von
    Mises distributions, with points ``(cos a1, sin a1, cos a2, sin a2)``.

    Args:
        factors: distributions with ``log_prob``, ``sample``, a ``manifold`` and the size ``d`` of their
            (vector) points.
    """

    def __init__(self, factors: list):
        if not factors:
            raise ValueError("a product needs at least one factor")
        for f in factors:
            if getattr(f, "manifold", None) is None or not isinstance(getattr(f, "d", None), int):
                raise ValueError(f"a factor of a product needs a manifold and a point size d (vector points): "
                                 f"{type(f).__name__} has not both")
        self.factors, self.sizes = list(factors), [f.d for f in factors]
        self.d = sum(self.sizes)
        self.manifold = geoopt.ProductManifold(*[(f.manifold, f.d) for f in factors])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.d)  # each factor checks that its part lies on its manifold
        return sum(f.log_prob(part) for f, part in zip(self.factors, x.split(self.sizes, -1)))

    def sample(self, n: int, *, dtype=None, generator=None) -> torch.Tensor:
        return torch.cat([f.sample(n, dtype=dtype, generator=generator) for f in self.factors], -1)


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
