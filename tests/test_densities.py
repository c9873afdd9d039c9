"""Densities on S^2: base distributions against closed forms, and a CNF whose density integrates to 1."""

import math

import numpy as np
import pytest
import torch

import manifolds
from manifolds.distributions import StandardNormal, UniformSphere, VonMisesFisher
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
