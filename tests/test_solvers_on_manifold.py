"""The state stays on the manifold: 10,000 float32 steps on a sphere, and any geoopt manifold.

Every method keeps ``| |x| - r | <= 1e-5`` after 10,000 float32 steps of a nonlinear field on the
sphere of radius 3 (the adaptive ones over a long horizon), while torchdiffeq's Euler on the same
problem drifts by more than 1e-3, so the check can tell the two apart. Strict-mode solves on a
geoopt ``PoincareBall`` and ``EuclideanStiefel`` stay on those manifolds too.
"""

import geoopt
import pytest
import torch
import torchdiffeq

import manifolds
import solvers

D = 8
RADIUS = 3.0
STEPS = 10_000
T = 100.0  # h = 0.01


@pytest.fixture
def field():
    """A fixed nonlinear field that is neither tangent nor small: ``A x + tanh(W x)``."""
    a = torch.randn(D, D)
    a = (a - a.T) / 2
    w = torch.randn(D, D) / D**0.5
    return lambda t, x: x @ a.T + torch.tanh(x @ w.T)


@pytest.fixture
def x0():
    return manifolds.Sphere(RADIUS).projx(torch.randn(D))


def radius_drift(ys: torch.Tensor) -> float:
    return (ys.norm(dim=-1) - RADIUS).abs().max().item()


@pytest.mark.parametrize(
    "method, mode",
    [(m, mode) for m in ("euler", "midpoint", "heun", "rk4") for mode in ("strict", "relaxed")]
    + [("rkmk2", "strict"), ("rkmk4", "strict")],  # RKMK ignores the mode
)
def test_fixed_step_methods_stay_on_sphere_for_10k_float32_steps(field, x0, method, mode):
    sphere = manifolds.Sphere(RADIUS)
    ys = solvers.odeint(field, x0, torch.linspace(0, T, 5), method=method, manifold=sphere,
                        options={"step_size": T / STEPS, "mode": mode})
    assert ys.dtype == torch.float32
    assert radius_drift(ys) <= 1e-5


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
def test_adaptive_methods_stay_on_sphere_over_a_long_horizon(field, x0, method):
    stats = solvers.SolveStats()
    ys = solvers.odeint(field, x0, torch.linspace(0, 150.0, 31), method=method,
                        manifold=manifolds.Sphere(RADIUS), rtol=1e-4, atol=1e-6, options={"stats": stats})
    assert stats.steps >= 1000  # a long solve, not a handful of big steps
    assert radius_drift(ys) <= 1e-5


def test_torchdiffeq_euler_drifts_off_the_sphere(field, x0):
    # The same field, made tangent so the drift is the integrator's, not the field's.
    sphere = manifolds.Sphere(RADIUS)
    tangent = lambda t, x: sphere.proju(x, field(t, x))  # noqa: E731
    ys = torchdiffeq.odeint(tangent, x0, torch.linspace(0, T, 5), method="euler", options={"step_size": T / STEPS})
    assert radius_drift(ys) > 1e-3


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_solvers_stay_on_a_poincare_ball(method):
    ball = geoopt.PoincareBall(c=1.0)
    w = torch.randn(4, 4, dtype=torch.float64)
    target = torch.tensor([0.0, 0.95, 0.0, 0.3], dtype=torch.float64)
    # Rotates and drifts towards a point near the boundary |x| = 1.
    field = lambda t, x: torch.tanh(x @ w.T) * (1 - x.pow(2).sum()) + 2.0 * (target - x)  # noqa: E731
    x0 = ball.projx(0.3 * torch.randn(4, dtype=torch.float64))
    ys = solvers.odeint(field, x0, torch.linspace(0, 3.0, 7), method=method, manifold=ball,
                        options={} if method == "dopri5" else {"step_size": 0.05})
    assert ys[-1].norm() > 0.8  # it travelled from |x0| = 0.56 towards the boundary
    assert ball.check_point_on_manifold(ys)


@pytest.mark.parametrize("method", ["euler", "rk4", "rkmk4", "dopri5"])
def test_solvers_stay_on_a_stiefel_manifold(method):
    # geoopt's own EuclideanStiefel for Runge-Kutta; ours for RKMK (geoopt's SVD projx has a NaN
    # gradient at orthonormal matrices, so rkmk is refused on it).
    stiefel = manifolds.Stiefel() if method.startswith("rkmk") else geoopt.EuclideanStiefel()
    a = torch.randn(5, 5)
    a = (a - a.T) / 2
    w = torch.randn(2, 2)
    field = lambda t, x: a @ x + torch.tanh(x @ w)  # noqa: E731
    x0 = stiefel.projx(torch.randn(5, 2))
    options = {} if method == "dopri5" else {"step_size": 0.01}
    ys = solvers.odeint(field, x0, torch.linspace(0, 5.0, 6), method=method, manifold=stiefel,
                        rtol=1e-5, atol=1e-6, options=options)
    gram = ys.transpose(-1, -2) @ ys  # (T, 2, 2)
    assert (gram - torch.eye(2)).abs().max() <= 1e-5
    assert (ys[-1] - x0).norm() > 0.1  # it moved
