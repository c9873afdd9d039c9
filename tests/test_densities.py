"""Densities on S^2: base distributions against closed forms, and a CNF whose density integrates to 1."""

import math

import geoopt
import numpy as np
import pytest
import torch

import manifolds
from manifolds.distributions import StandardNormal, UniformSphere, VonMisesFisher, WrappedNormal
from solvers.cnf import CNF

F64 = torch.float64


def sphere_quadrature(n_theta=48, n_phi=96):
    """Points of S^2 and weights: Gauss-Legendre in cos(theta), uniform in phi (exact for smooth densities)."""
    z, wz = np.polynomial.legendre.leggauss(n_theta)
    phi = np.arange(n_phi) * 2 * np.pi / n_phi
    z, phi = np.meshgrid(z, phi, indexing="ij")
    r = np.sqrt(1 - z**2)
    points = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1).reshape(-1, 3)
    weights = (wz[:, None] * np.full(n_phi, 2 * np.pi / n_phi)[None, :]).reshape(-1)
    return torch.tensor(points, dtype=F64), torch.tensor(weights, dtype=F64)


@pytest.mark.parametrize("base", [UniformSphere(3), VonMisesFisher(torch.tensor([0.0, 0.6, 0.8], dtype=F64), 4.0),
                                  VonMisesFisher(torch.tensor([1.0, 0.0, 0.0], dtype=F64), 60.0)])
def test_base_densities_on_the_sphere_integrate_to_one(base):
    x, w = sphere_quadrature(n_theta=200 if getattr(base, "kappa", 0) > 10 else 48)
    assert (base.log_prob(x).exp() * w).sum().item() == pytest.approx(1.0, abs=1e-8)


def test_vmf_samples_have_the_closed_form_mean_resultant_length():
    kappa, mu = 4.0, torch.tensor([0.0, 0.6, 0.8], dtype=F64)
    x = VonMisesFisher(mu, kappa).sample(20000, generator=torch.Generator().manual_seed(0))
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-12
    w = x @ mu
    expected = 1 / math.tanh(kappa) - 1 / kappa  # E[mu.x]
    assert abs(w.mean().item() - expected) < 3 * w.std().item() / math.sqrt(len(w))
    orthogonal = x - w[:, None] * mu  # uniform around mu: mean zero
    assert orthogonal.mean(0).abs().max() < 0.02


def test_standard_normal_matches_torch():
    x = torch.randn(5, 3, dtype=F64)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(StandardNormal(3).log_prob(x), want)


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.nn.Parameter(torch.randn(16, 3, dtype=F64, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(3, 16, dtype=F64, generator=g) / 4)

    def forward(self, t, x):
        return torch.tanh(x @ self.w1.T) @ self.w2.T


def test_a_cnfs_density_integrates_to_one_and_agrees_with_its_samples():
    cnf = CNF(Field(), manifolds.Sphere(1.0), UniformSphere(3))
    x, w = sphere_quadrature()
    with torch.no_grad():
        logp = cnf.log_prob(x)
    assert logp.std() > 0.1  # far from uniform: the flow moved mass
    assert (logp.exp() * w).sum().item() == pytest.approx(1.0, abs=1e-3)
    samples, logq = cnf.sample_and_log_prob(64, generator=torch.Generator().manual_seed(2))
    assert (samples.norm(dim=-1) - 1).abs().max() < 1e-12
    torch.testing.assert_close(cnf.log_prob(samples), logq, rtol=0, atol=1e-5)


def test_log_prob_trains_and_refuses_points_off_the_sphere():
    cnf = CNF(Field(), manifolds.Sphere(1.0), VonMisesFisher(torch.tensor([0.0, 0.0, 1.0], dtype=F64), 2.0))
    x = manifolds.Sphere(1.0).projx(torch.randn(8, 3, dtype=F64))
    (-cnf.log_prob(x).mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cnf.parameters())
    with pytest.raises(ValueError, match="log_prob was asked at points off Sphere"):
        cnf.log_prob(2 * x)
    with pytest.raises(ValueError, match="mu must have 2 or 3 entries"):
        VonMisesFisher(torch.ones(4, dtype=F64), 1.0)


def _euler_zyz(a, b, c):
    def rz(t):
        ct, st = torch.cos(t), torch.sin(t)
        z, o = torch.zeros_like(t), torch.ones_like(t)
        return torch.stack([torch.stack([ct, -st, z]), torch.stack([st, ct, z]), torch.stack([z, z, o])])

    def ry(t):
        ct, st = torch.cos(t), torch.sin(t)
        z, o = torch.zeros_like(t), torch.ones_like(t)
        return torch.stack([torch.stack([ct, z, st]), torch.stack([z, o, z]), torch.stack([-st, z, ct])])

    return rz(a) @ ry(b) @ rz(c)


def test_haar_so3_density_is_one_over_the_frobenius_volume():
    # The volume element of the Euler-angle chart in the Frobenius metric, from its Jacobian:
    # sqrt(det(J^T J)) = 2 sqrt(2) sin(beta), so the volume is 2 sqrt(2) (2 pi)(2)(2 pi) = 16 sqrt(2) pi^2.
    for angles in ([0.3, 1.1, -0.7], [2.0, 0.4, 1.3]):
        J = torch.autograd.functional.jacobian(lambda v: _euler_zyz(*v).reshape(-1), torch.tensor(angles, dtype=F64))
        element = torch.sqrt(torch.det(J.T @ J)).item()
        assert element == pytest.approx(2 * math.sqrt(2) * math.sin(angles[1]), rel=1e-12)
    haar = manifolds.HaarSO3()
    x = haar.sample(4000, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert haar.log_prob(x).exp()[0].item() * 16 * math.sqrt(2) * math.pi**2 == pytest.approx(1.0, rel=1e-12)
    assert (torch.det(x) - 1).abs().max() < 1e-12
    assert (x.transpose(-1, -2) @ x - torch.eye(3, dtype=F64)).abs().max() < 1e-12
    # Haar moments: E[R] = 0 and E[R_ij^2] = 1/3.
    assert x.mean(0).abs().max() < 4 / math.sqrt(3 * len(x))
    assert (x.pow(2).mean(0) - 1 / 3).abs().max() < 0.03


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
def test_cnf_gradients_by_checkpoint_and_adjoint_match_backprop(gradient):
    x = manifolds.Sphere(1.0).projx(torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5)))

    def grads(options):
        field = Field()
        cnf = CNF(field, manifolds.Sphere(1.0), UniformSphere(3), options=options)
        cnf.log_prob(x).sum().backward()
        return torch.cat([p.grad.flatten() for p in field.parameters()])

    steps = 3 if gradient == "checkpoint" else 10  # checkpointing reruns the divergence's double backward: slow
    reference = grads({"steps": steps})
    got = grads({"steps": steps, "gradient": gradient})
    # checkpoint recomputes backprop exactly; the adjoint is the exact flow's gradient (rk4's error at h = 0.1).
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-12 if gradient == "checkpoint" else 1e-4)


def disk_quadrature(n_rho=160, n_phi=160, c=1.0):
    """Points of the Poincaré disk and weights for its Riemannian area lambda(x)^2 dx: Gauss-Legendre in the
    Euclidean radius, uniform in the angle."""
    rho, w = np.polynomial.legendre.leggauss(n_rho)
    rho, w = (rho + 1) / (2 * math.sqrt(c)), w / (2 * math.sqrt(c))  # onto [0, 1/sqrt(c))
    phi = np.arange(n_phi) * 2 * np.pi / n_phi
    rho, phi = np.meshgrid(rho, phi, indexing="ij")
    points = np.stack([rho * np.cos(phi), rho * np.sin(phi)], -1).reshape(-1, 2)
    lam = 2 / (1 - c * rho**2)
    weights = (w[:, None] * rho * lam**2 * 2 * np.pi / n_phi).reshape(-1)
    return torch.tensor(points, dtype=F64), torch.tensor(weights, dtype=F64)


@pytest.mark.parametrize("c", [1.0, 2.5])
def test_wrapped_normal_integrates_to_one_and_its_samples_have_the_density_mean(c):
    wn = WrappedNormal(torch.tensor([0.3, -0.2], dtype=F64) / math.sqrt(c), 0.6, c=c)
    x, w = disk_quadrature(c=c)
    p = wn.log_prob(x).exp() * w
    assert p.sum().item() == pytest.approx(1.0, abs=1e-8)
    mean = (p[:, None] * x).sum(0)  # E[x] from the density, by quadrature
    samples = wn.sample(20000, generator=torch.Generator().manual_seed(7))
    assert (c * samples.pow(2).sum(-1)).max() < 1
    se = samples.std(0) / math.sqrt(len(samples))
    assert ((samples.mean(0) - mean).abs() < 4 * se).all(), (samples.mean(0), mean, se)
    # The tangent law: the squared distance to mu is sigma^2 chi^2_d, mean d sigma^2.
    r2 = wn.manifold.dist(wn.mu, samples).pow(2)
    assert abs(r2.mean().item() - 2 * 0.36) < 4 * r2.std().item() / math.sqrt(len(r2))


@pytest.mark.parametrize("d", [2, 3])
def test_wrapped_normal_log_prob_is_the_normal_over_the_exp_maps_volume_change(d):
    # Independently of the sinh formula: x = exp_mu(u / lambda(mu)) with u ~ N(0, sigma^2 I), so the density
    # with respect to lambda(x)^d dx is N(u) / (|det dx/du| lambda(x)^d), the Jacobian by autograd.
    c, sigma = 1.5, 0.7
    wn = WrappedNormal(torch.tensor([0.2, -0.35, 0.1][:d], dtype=F64), sigma, c=c)
    ball, lam_mu = wn.manifold, wn.manifold.lambda_x(wn.mu)
    for seed in range(3):
        u = sigma * torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
        x = ball.expmap(wn.mu, u / lam_mu)
        J = torch.autograd.functional.jacobian(lambda v: ball.expmap(wn.mu, v / lam_mu), u)
        normal = torch.distributions.Normal(0.0, torch.tensor(sigma, dtype=F64)).log_prob(u).sum()
        want = normal - torch.linalg.slogdet(J)[1] - d * torch.log(ball.lambda_x(x)).squeeze()
        assert wn.log_prob(x[None])[0].item() == pytest.approx(want.item(), abs=1e-10)


def test_a_cnf_on_the_poincare_disk_with_a_wrapped_normal_base_integrates_to_one():
    ball = geoopt.PoincareBall()
    wn = WrappedNormal(torch.tensor([0.1, 0.2], dtype=F64), 0.5)
    field = Field2()
    cnf = CNF(field, ball, wn)
    x, w = disk_quadrature(96, 96)
    with torch.no_grad():
        logp = cnf.log_prob(x)
    assert (logp - wn.log_prob(x)).abs().max() > 0.3  # the flow moved mass
    assert (logp.exp() * w).sum().item() == pytest.approx(1.0, abs=1e-6)  # measured: 5e-13


def test_wrapped_normal_refuses_bad_input_in_one_line():
    wn = WrappedNormal(torch.tensor([0.1, 0.2], dtype=F64), 0.5)
    with pytest.raises(ValueError, match="a density on PoincareBall manifold was asked at points off it"):
        wn.log_prob(torch.tensor([[0.8, 0.7]], dtype=F64))
    with pytest.raises(ValueError, match="points must have 2 coordinates"):
        wn.log_prob(torch.zeros(1, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"mu must lie inside the ball of radius 1/sqrt\(c\) = 0.707107"):
        WrappedNormal(torch.tensor([0.6, 0.6], dtype=F64), 0.5, c=2.0)
    with pytest.raises(ValueError, match="sigma and c must be positive and finite, got sigma=nan"):
        WrappedNormal(torch.tensor([0.1, 0.2], dtype=F64), float("nan"))
    with pytest.raises(ValueError, match=r"lives on PoincareBall manifold \(curvature -1.0\), not on the flow's Sphere"):
        CNF(Field(), manifolds.Sphere(1.0), wn)
    with pytest.raises(ValueError, match=r"\(curvature -2.0\), not on the flow's PoincareBall manifold \(curvature -1.0\)"):
        CNF(Field(), geoopt.PoincareBall(c=1.0), WrappedNormal(torch.tensor([0.1, 0.2], dtype=F64), 0.3, c=2.0))
    with pytest.raises(ValueError, match="lives on Sphere\\(radius=1, eps=0\\) manifold, not on the flow's Sphere\\(radius=2"):
        CNF(Field(), manifolds.Sphere(2.0), UniformSphere(3))


def test_a_product_base_must_match_the_flow_factor_by_factor():
    circle = VonMisesFisher(torch.tensor([1.0, 0.0], dtype=F64), 2.0)
    torus = manifolds.distributions.Product([circle, circle])
    CNF(Field(), geoopt.ProductManifold((manifolds.Sphere(), 2), (manifolds.Sphere(), 2)), torus)  # the same torus
    for other in (geoopt.ProductManifold((manifolds.Sphere(), 2), (manifolds.Sphere(2.0), 2)),  # another radius
                  geoopt.ProductManifold((manifolds.Sphere(), 2), (geoopt.Euclidean(1), 2)),   # another factor
                  geoopt.ProductManifold((manifolds.Sphere(), 2), (manifolds.Sphere(), 3)),   # another size
                  geoopt.ProductManifold((manifolds.Sphere(), 2),)):                          # fewer factors
        with pytest.raises(ValueError, match=r"lives on \(Sphere\)x\(Sphere\) manifold, not on the flow's"):
            CNF(Field(), other, torus)


class Field2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.w1 = torch.nn.Parameter(torch.randn(16, 2, dtype=F64, generator=g) * 2)
        self.w2 = torch.nn.Parameter(torch.randn(2, 16, dtype=F64, generator=g) / 2)

    def forward(self, t, x):
        # Bounded in the ball's metric (Euclidean size over lambda(x)^2, lambda = 2 / (1 - |x|^2)): no point
        # reaches the boundary in finite time, the quadrature's outermost ones included.
        return torch.tanh(x @ self.w1.T) @ self.w2.T * (1 - x.pow(2).sum(-1, keepdim=True)).pow(2) / 4


def test_a_vmf_mixture_integrates_to_one_and_draws_each_component_by_its_weight():
    means = [torch.tensor(m, dtype=F64) for m in ([0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0])]
    mixture = manifolds.Mixture([VonMisesFisher(m, k) for m, k in zip(means, (30.0, 40.0, 50.0))], [1.0, 2.0, 5.0])
    x, w = sphere_quadrature(n_theta=200)
    assert (mixture.log_prob(x).exp() * w).sum().item() == pytest.approx(1.0, abs=1e-8)
    samples = mixture.sample(8000, generator=torch.Generator().manual_seed(9))
    nearest = torch.stack([samples @ m for m in means], -1).argmax(-1)  # well separated: the component drawn
    share = torch.bincount(nearest, minlength=3).double() / len(samples)
    expected = torch.tensor([1 / 8, 2 / 8, 5 / 8], dtype=F64)
    assert ((share - expected).abs() < 4 * (expected * (1 - expected) / len(samples)).sqrt()).all(), share
    assert (nearest[:100] != nearest[0]).any()  # shuffled, not in blocks
    with pytest.raises(ValueError, match="must live on one manifold"):
        manifolds.Mixture([UniformSphere(3), WrappedNormal(torch.zeros(3, dtype=F64), 1.0)])
    with pytest.raises(ValueError, match="need one finite weight >= 0 per component"):
        manifolds.Mixture([UniformSphere(3)], [float("nan")])


# The circle and the flat torus: von Mises distributions, products of them, a CNF on the product of two circles.

def circle_points(angles):
    return torch.stack([angles.cos(), angles.sin()], -1)


def torus_grid(n):
    """The ``n x n`` grid of angle pairs on the flat torus, as points ``(cos a1, sin a1, cos a2, sin a2)``, and
    the trapezoid weight ``(2 pi / n)^2`` (spectrally accurate for smooth periodic densities)."""
    a = torch.arange(n, dtype=F64) * 2 * math.pi / n - math.pi
    a1, a2 = torch.meshgrid(a, a, indexing="ij")
    points = torch.cat([circle_points(a1.reshape(-1)), circle_points(a2.reshape(-1))], -1)
    return points, (2 * math.pi / n) ** 2


@pytest.mark.parametrize("kappa", [0.05, 1.5, 60.0])
def test_von_mises_on_the_circle_integrates_to_one_and_is_the_angles_von_mises_density(kappa):
    mu = torch.tensor([0.6, -0.8], dtype=F64)
    vm = VonMisesFisher(mu, kappa)
    n = 4000
    theta = torch.arange(n, dtype=F64) * 2 * math.pi / n  # periodic trapezoid: exact to rounding here
    x = circle_points(theta)
    assert (vm.log_prob(x).exp().sum() * 2 * math.pi / n).item() == pytest.approx(1.0, abs=1e-12)
    # The angle from mu has torch's von Mises density (its log I_0 is a polynomial fit: off by 4e-7 at kappa 60).
    angle = torch.atan2(mu[0] * x[:, 1] - mu[1] * x[:, 0], x @ mu)
    want = torch.distributions.VonMises(torch.tensor(0.0, dtype=F64), torch.tensor(kappa, dtype=F64)).log_prob(angle)
    torch.testing.assert_close(vm.log_prob(x), want, rtol=0, atol=1e-6)


def assert_mean_resultant_length(cosines, kappa):
    """The sample mean of ``cos(angle from mu)`` is within 4 standard errors of ``I_1(kappa) / I_0(kappa)``."""
    k = torch.tensor(kappa, dtype=F64)
    want = (torch.special.i1e(k) / torch.special.i0e(k)).item()  # the scaled Bessel functions' ratio is the same
    assert abs(cosines.mean().item() - want) < 4 * cosines.std().item() / math.sqrt(len(cosines))


@pytest.mark.parametrize("kappa", [1e-3, 0.5, 4.0, 1e3])
def test_von_mises_samples_pass_a_ks_test_against_the_quadrature_cdf(kappa):
    mu = torch.tensor([-1.0, 1.0], dtype=F64) / math.sqrt(2)
    vm = VonMisesFisher(mu, kappa)
    x = vm.sample(20000, generator=torch.Generator().manual_seed(11))
    assert x.dtype == F64 and (x.norm(dim=-1) - 1).abs().max() < 1e-12
    across = torch.stack([-mu[1], mu[0]])  # mu turned by 90 degrees
    angle, _ = torch.atan2(x @ across, x @ mu).sort()  # from mu, in [-pi, pi]
    # The CDF of the angle on a fine grid (cumulative trapezoid of the density), interpolated linearly.
    grid = torch.linspace(-math.pi, math.pi, 200001, dtype=F64)
    density = vm.log_prob(grid.cos()[:, None] * mu + grid.sin()[:, None] * across).exp()
    steps = (density[1:] + density[:-1]) / 2 * (grid[1] - grid[0])
    cdf = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(steps, 0)])
    assert cdf[-1].item() == pytest.approx(1.0, abs=1e-9)
    at = np.interp(angle.numpy(), grid.numpy(), cdf.numpy())
    empirical = np.arange(1, len(at) + 1) / len(at)
    ks = max(np.max(empirical - at), np.max(at - (empirical - 1 / len(at))))
    assert ks < 1.63 / math.sqrt(len(at)), ks  # the 1% critical value
    assert_mean_resultant_length(x @ mu, kappa)


def test_a_product_of_von_mises_is_normalised_on_the_torus_and_its_factors_are_independent():
    mus = [torch.tensor([math.cos(a), math.sin(a)], dtype=F64) for a in (2.5, -1.0)]
    product = manifolds.Product([VonMisesFisher(mus[0], 3.0), VonMisesFisher(mus[1], 0.7)])
    assert product.d == 4 and isinstance(product.manifold, geoopt.ProductManifold)
    x, w = torus_grid(128)
    assert (product.log_prob(x).exp() * w).sum().item() == pytest.approx(1.0, abs=1e-12)
    factors = product.factors[0].log_prob(x[:, :2]) + product.factors[1].log_prob(x[:, 2:])
    torch.testing.assert_close(product.log_prob(x), factors)
    samples = product.sample(20000, generator=torch.Generator().manual_seed(12))
    assert product.manifold.check_point_on_manifold(samples)
    c1, c2 = samples[:, :2] @ mus[0], samples[:, 2:] @ mus[1]
    assert_mean_resultant_length(c1, 3.0)
    assert_mean_resultant_length(c2, 0.7)
    r = torch.corrcoef(torch.stack([c1, c2]))[0, 1].item()  # independent factors: uncorrelated
    assert abs(r) < 4 / math.sqrt(len(c1))
    uniform = manifolds.Product([UniformSphere(2), UniformSphere(2)])
    torch.testing.assert_close(uniform.log_prob(x), torch.full((len(x),), -2 * math.log(2 * math.pi), dtype=F64))


def test_a_mixture_of_products_integrates_to_one_on_the_torus_and_bad_input_is_refused():
    def component(a1, a2, k1, k2):
        return manifolds.Product([VonMisesFisher(circle_points(torch.tensor(a1, dtype=F64)), k1),
                                  VonMisesFisher(circle_points(torch.tensor(a2, dtype=F64)), k2)])

    mixture = manifolds.Mixture([component(3.0, 3.0, 20.0, 8.0), component(-1.0, 0.5, 2.0, 30.0)], [2.0, 1.0])
    x, w = torus_grid(256)
    assert (mixture.log_prob(x).exp() * w).sum().item() == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="points must have 4 coordinates"):
        mixture.log_prob(x[:, :3])
    with pytest.raises(ValueError, match="asked at points off it"):
        mixture.log_prob(2 * x)
    with pytest.raises(ValueError, match="HaarSO3 has not both"):
        manifolds.Product([UniformSphere(2), manifolds.HaarSO3()])
    with pytest.raises(ValueError, match="mu must have 2 or 3 entries"):
        VonMisesFisher(torch.ones(1, dtype=F64), 1.0)


class TorusField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(13)
        self.w1 = torch.nn.Parameter(torch.randn(16, 4, dtype=F64, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(4, 16, dtype=F64, generator=g) / 5)

    def forward(self, t, x):
        return torch.tanh(x @ self.w1.T) @ self.w2.T


def test_the_divergence_on_the_torus_is_the_angle_coordinates_divergence():
    # On the flat torus the angles are isometric coordinates: div F = sum_i d g_i / d a_i, with g_i the field's
    # component along the i-th circle's unit tangent (-sin a_i, cos a_i); here by autograd in the angles.
    torus = manifolds.Product([UniformSphere(2), UniformSphere(2)]).manifold
    field = TorusField()
    angles = torch.rand(8, 2, dtype=F64, generator=torch.Generator().manual_seed(14)) * 2 * math.pi

    def in_angles(a):
        x = torch.cat([circle_points(a[0]), circle_points(a[1])])
        f = field(0.0, x)
        return torch.stack([-a[0].sin() * f[0] + a[0].cos() * f[1], -a[1].sin() * f[2] + a[1].cos() * f[3]])

    want = torch.stack([torch.autograd.functional.jacobian(in_angles, a).trace() for a in angles])
    x = torch.cat([circle_points(angles[:, 0]), circle_points(angles[:, 1])], -1)
    from solvers import divergence

    torch.testing.assert_close(divergence(field, 0.0, x, torus), want, rtol=0, atol=1e-12)


def test_a_cnf_on_the_torus_integrates_to_one_and_agrees_with_its_samples():
    base = manifolds.Product([UniformSphere(2), UniformSphere(2)])
    cnf = CNF(TorusField(), base.manifold, base)
    x, w = torus_grid(96)
    with torch.no_grad():
        logp = cnf.log_prob(x)
    assert logp.max() - logp.min() > 3  # the flow moved mass
    assert (logp.exp() * w).sum().item() == pytest.approx(1.0, abs=1e-6)  # measured: 4e-8 (rk4's 20 steps)
    samples, logq = cnf.sample_and_log_prob(64, generator=torch.Generator().manual_seed(15))
    assert base.manifold.check_point_on_manifold(samples, atol=1e-12, rtol=0)
    torch.testing.assert_close(cnf.log_prob(samples), logq, rtol=0, atol=1e-5)


class Rotation(torch.nn.Module):
    """A parameter-free field on S^2: rotation about the z axis."""

    def forward(self, t, x):
        return torch.stack([-x[..., 1], x[..., 0], torch.zeros_like(x[..., 2])], -1)


class Learned(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, t, x):
        return self.net(x)


def test_a_cnf_samples_in_its_fields_dtype_unless_told():
    cnf = CNF(Learned(), manifolds.Sphere(1.0), UniformSphere(3), options={"steps": 4})  # float32 parameters
    x, logp = cnf.sample_and_log_prob(5, generator=torch.Generator().manual_seed(0))
    assert cnf.sample(5).dtype == x.dtype == logp.dtype == torch.float32
    cnf.field.double()
    assert cnf.sample(5).dtype == torch.float64
    rotation = Rotation()
    for field in (rotation, lambda t, x: rotation(t, x)):  # no tensors, a plain function: float64
        free = CNF(field, manifolds.Sphere(1.0), UniformSphere(3), options={"steps": 4})
        assert free.sample(5).dtype == F64
        assert free.sample(5, dtype=torch.float32).dtype == torch.float32  # an explicit dtype wins
    buffered = Rotation()
    buffered.register_buffer("axis", torch.tensor([0.0, 0.0, 1.0], dtype=F64))  # a buffer-only field
    assert CNF(buffered, manifolds.Sphere(1.0), UniformSphere(3), options={"steps": 4}).sample(5).dtype == F64


def test_a_product_base_refusal_names_each_factors_curvature():
    ball = WrappedNormal(torch.tensor([0.1, 0.2], dtype=F64), 0.3, c=1.000002)
    flow = geoopt.ProductManifold((geoopt.PoincareBall(c=1.0), 2), (geoopt.PoincareBall(c=1.0), 2))
    with pytest.raises(ValueError, match=r"\(curvatures -1.000002, -1.0\), not on the flow's .* \(curvatures -1.0, -1.0\)"):
        CNF(Field(), flow, manifolds.distributions.Product([ball, WrappedNormal(torch.zeros(2, dtype=F64), 0.3)]))
