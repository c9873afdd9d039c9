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
    with pytest.raises(ValueError, match="mu must have 3 entries"):
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
    with pytest.raises(ValueError, match="lives on PoincareBall manifold, not on the flow's Sphere"):
        CNF(Field(), manifolds.Sphere(1.0), wn)
    with pytest.raises(ValueError, match="lives on Sphere\\(radius=1, eps=0\\) manifold, not on the flow's Sphere\\(radius=2"):
        CNF(Field(), manifolds.Sphere(2.0), UniformSphere(3))


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
