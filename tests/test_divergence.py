"""Divergence on manifolds: integrated along the flow it is the log-volume change of the flow map."""

import math

import geoopt
import pytest
import torch

import manifolds
import solvers
from solvers.divergence import divergence

F64 = torch.float64


def _field(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=F64) / n**0.5
    a = torch.randn(n, n, generator=g, dtype=F64)
    a = (a - a.T) / 2
    return lambda t, x: torch.tanh(x @ w.T) + x @ a.T


def _flow(f, manifold, steps=100):
    return lambda x: solvers.odeint(f, x, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", manifold=manifold,
                                    options={"steps": steps})[-1]


def _logdet_and_integral(f, manifold, x0, basis):
    """log|det| of the flow map's tangent Jacobian, and the integral of the divergence along it."""
    flow = _flow(f, manifold)
    xt = flow(x0)
    J = torch.autograd.functional.jacobian(flow, x0).reshape(x0.numel(), x0.numel())
    b0, bt = basis(x0), basis(xt)
    logdet = torch.linalg.slogdet(bt.T @ J @ b0)[1].item()
    aug = lambda t, y: (manifold.proju(y[0], f(t, y[0])), divergence(f, t, y[0], manifold).reshape(1))  # noqa: E731
    _, L = solvers.odeint(aug, (x0, torch.zeros(1, dtype=F64)), torch.tensor([0.0, 1.0], dtype=F64),
                          method="rk4", manifold=(manifold, None), options={"steps": 100})
    return logdet, L[-1].item(), xt


def _null_basis(projector):
    # An orthonormal basis of the tangent space: the projector's eigenvectors of eigenvalue 1.
    vals, vecs = torch.linalg.eigh(projector)
    return vecs[:, vals > 0.5]


def test_on_the_sphere():
    sphere = manifolds.Sphere(1.0)
    x0 = sphere.projx(torch.tensor([0.3, -0.5, 0.8], dtype=F64))
    f = _field(3, 0)
    basis = lambda x: _null_basis(torch.eye(3, dtype=F64) - torch.outer(x, x))  # noqa: E731
    logdet, integral, _ = _logdet_and_integral(f, sphere, x0, basis)
    assert abs(logdet) > 0.05  # the flow really changes volume
    assert integral == pytest.approx(logdet, abs=1e-6)


def test_on_so3():
    so3 = manifolds.SpecialOrthogonal()
    x0 = so3.projx(torch.eye(3, dtype=F64) + 0.3 * torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    w = torch.randn(9, 9, generator=g, dtype=F64) / 3
    f = lambda t, x: torch.tanh(x.flatten(-2) @ w.T).view_as(x)  # noqa: E731
    generators = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        e = torch.zeros(3, 3, dtype=F64)
        e[i, j], e[j, i] = 1 / math.sqrt(2), -1 / math.sqrt(2)
        generators.append(e)
    basis = lambda x: torch.stack([(x @ e).flatten() for e in generators], -1)  # noqa: E731  (orthonormal)
    logdet, integral, _ = _logdet_and_integral(f, so3, x0, basis)
    assert abs(logdet) > 0.05
    assert integral == pytest.approx(logdet, abs=1e-6)


def test_on_the_poincare_ball_with_the_metric_correction():
    ball = geoopt.PoincareBall()
    x0 = torch.tensor([0.2, -0.3], dtype=F64)
    f = _field(2, 3)
    logdet, integral, xt = _logdet_and_integral(f, ball, x0, lambda x: torch.eye(2, dtype=F64))
    lam = lambda x: 2 / (1 - x.pow(2).sum())  # noqa: E731
    riemannian = logdet + 2 * (math.log(lam(xt)) - math.log(lam(x0)))  # d = 2: the volume element lambda^2
    assert abs(riemannian - logdet) > 1e-3  # the correction matters here
    assert integral == pytest.approx(riemannian, abs=1e-6)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(noise):
    sphere = manifolds.Sphere(1.0)
    x = sphere.projx(torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4)))
    f = _field(3, 5)
    exact = divergence(f, 0.0, x, sphere)
    g = torch.Generator().manual_seed(6)
    draws = torch.stack([divergence(f, 0.0, x, sphere, method="hutchinson", noise=noise, generator=g)
                         for _ in range(2000)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - exact).abs() <= 3 * se + 1e-12).all(), (mean, exact, se)
    assert (se > 0).all()


def test_divergence_is_differentiable_and_refuses_what_it_does_not_support():
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    sphere = manifolds.Sphere(1.0)
    x = sphere.projx(torch.randn(5, 3, dtype=F64))
    div = divergence(lambda t, x: torch.tanh(x @ w.T), 0.0, x, sphere)
    (grad,) = torch.autograd.grad(div.sum(), w)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    with pytest.raises(ValueError, match="divergence is not offered on Lorentz"):
        divergence(lambda t, x: x, 0.0, torch.tensor([1.0, 0.0, 0.0], dtype=F64), geoopt.Lorentz())
    with pytest.raises(ValueError, match="unknown divergence method 'trace'"):
        divergence(lambda t, x: x, 0.0, x, sphere, method="trace")
