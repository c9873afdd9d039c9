"""Fitted convergence orders prove that every method has the order its docstring claims.

Each method solves rotations of a sphere with closed-form solutions in float64 at five step sizes;
the least-squares slope of log(error) against log(h) must be within 0.3 of the method's order, in
both modes, on spheres of radius 1 and 2.5. A field with a normal part separates the modes: strict
keeps its order, relaxed drops to first order (as ``RungeKutta``'s docstring warns). On
``SphereExact`` Runge-Kutta methods are capped at second order but stay on the sphere. RKMK runs
on ``odeint``'s sphere action, the factored ``LowRankSphereAction``, whose solves match the dense
``SphereAction``'s to rounding.
"""

import math

import numpy as np
import pytest
import torch

import manifolds
import solvers

D = 5  # ambient dimension: the sphere S^4
T = 1.0  # end time
F64 = torch.float64

ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rkmk2": 2, "rkmk4": 4}
# Step counts over [0, T]: errors stay well above float64 rounding and inside the asymptotic range.
STEPS = {
    1: (16, 32, 64, 128, 256),
    2: (8, 16, 32, 64, 128),
    3: (4, 8, 16, 32, 64),
    4: (4, 8, 16, 32, 64),
    5: (2, 4, 8, 16, 32),
}


def fitted_order(steps, errors) -> float:
    """Least-squares slope of log(error) against log(h) with ``h = T / steps``."""
    return np.polyfit(np.log(T / np.asarray(steps)), np.log(np.asarray(errors)), 1)[0]


def skew(d: int) -> torch.Tensor:
    a = torch.randn(d, d, dtype=F64)
    return (a - a.T) / 2


def rotation(kind: str, radius: float):
    """A rotation field on the sphere of ``radius``, a start point, and the exact end point.

    "constant": ``dx/dt = A x``, solution ``expm(t A) x0``.
    "time_varying": ``dx/dt = (1 + sin t) A x``; the generators commute, so the solution is
    ``expm((t + 1 - cos t) A) x0``.
    """
    a = skew(D)
    x0 = manifolds.Sphere(radius).projx(torch.randn(D, dtype=F64))
    if kind == "constant":
        return (lambda t, x: x @ a.T), x0, torch.linalg.matrix_exp(T * a) @ x0
    angle = T + 1 - math.cos(T)
    return (lambda t, x: (1 + torch.sin(t)) * (x @ a.T)), x0, torch.linalg.matrix_exp(angle * a) @ x0


def end_errors(f, x0, exact, method, manifold, mode, steps) -> list[float]:
    t = torch.tensor([0.0, T], dtype=F64)
    return [
        (solvers.odeint(f, x0, t, method=method, manifold=manifold, options={"steps": n, "mode": mode})[-1] - exact)
        .norm()
        .item()
        for n in steps
    ]


@pytest.mark.parametrize("radius", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["constant", "time_varying"])
@pytest.mark.parametrize("mode", ["strict", "relaxed"])
@pytest.mark.parametrize("method", list(ORDER))
def test_fitted_order_on_sphere(method, mode, kind, radius):
    f, x0, exact = rotation(kind, radius)
    steps = STEPS[ORDER[method]]
    errors = end_errors(f, x0, exact, method, manifolds.Sphere(radius), mode, steps)
    assert fitted_order(steps, errors) == pytest.approx(ORDER[method], abs=0.3), errors


@pytest.mark.parametrize("method", [m for m in ORDER if ORDER[m] <= 2 or m.startswith("rkmk")])
def test_exact_sphere_caps_runge_kutta_at_second_order_and_stays_on_the_sphere(method):
    # SphereExact steps by expmap of the increment's tangent part (see its docstring); RKMK does
    # not use the retraction and keeps its order. Runge-Kutta methods above order 2 are refused
    # there (tests/test_support_matrix.py).
    sphere = manifolds.SphereExact(2.5)
    f, x0, exact = rotation("time_varying", 2.5)
    steps = STEPS[ORDER[method]]
    t = torch.tensor([0.0, T], dtype=F64)
    ends = [solvers.odeint(f, x0, t, method=method, manifold=sphere, options={"steps": n})[-1] for n in steps]
    expected = ORDER[method]
    assert fitted_order(steps, [(y - exact).norm().item() for y in ends]) == pytest.approx(expected, abs=0.3)
    assert max(abs(y.norm().item() - 2.5) for y in ends) < 1e-12


@pytest.mark.parametrize("dim", [3, D])  # the 2-sphere steps with so(3) as R^3, the others in coordinates
@pytest.mark.parametrize("tableau", [solvers.HEUN, solvers.RK4], ids=lambda tab: tab.name)
def test_rkmk_solves_agree_on_the_low_rank_and_the_dense_sphere_action(tableau, dim):
    # A nonlinear field with a normal part, several points at once, large steps.
    sphere = manifolds.Sphere(2.5)
    w = torch.randn(dim, dim, dtype=F64)
    f = lambda t, x: 3.0 * torch.tanh(x @ w.T) * (1 + t)  # noqa: E731
    x0 = sphere.projx(torch.randn(3, dim, dtype=F64))
    ends = [
        solvers.integrate(f, x0, torch.tensor([0.0, T], dtype=F64), solver=solvers.RKMK(tableau, action),
                          manifold=sphere, controller=solvers.ConstantStepSize(steps=4)).ys[-1]
        for action in (manifolds.SphereAction(sphere), manifolds.LowRankSphereAction(sphere))
    ]
    torch.testing.assert_close(ends[1], ends[0], rtol=0, atol=1e-12)
    assert (ends[0] - x0).norm(dim=-1).min() > 1.0  # they went somewhere


@pytest.mark.parametrize("tableau", [solvers.BOSH3, solvers.DOPRI5], ids=lambda tab: tab.name)
def test_embedded_tableaus_have_their_order_at_fixed_steps(tableau):
    # The adaptive tableaus through the object API with constant steps: checks their b weights.
    f, x0, exact = rotation("time_varying", 2.5)
    sphere = manifolds.Sphere(2.5)
    steps = STEPS[tableau.order]
    errors = []
    for n in steps:
        sol = solvers.integrate(
            f, x0, torch.tensor([0.0, T], dtype=F64), solver=solvers.RungeKutta(tableau),
            manifold=sphere, controller=solvers.ConstantStepSize(steps=n),
        )
        errors.append((sol.ys[-1] - exact).norm().item())
    assert fitted_order(steps, errors) == pytest.approx(tableau.order, abs=0.3), errors


@pytest.mark.parametrize("tableau", [solvers.BOSH3, solvers.DOPRI5], ids=lambda tab: tab.name)
def test_error_estimate_scales_as_h_to_the_embedded_order_plus_one(tableau):
    # The estimate is the local error of the embedded solution: O(h^(error_order + 1)).
    f, x0, _ = rotation("time_varying", 1.0)
    solver = solvers.RungeKutta(tableau)
    hs = [0.2, 0.1, 0.05, 0.025, 0.0125]
    sizes = [solver.step(f, 0.3, x0, h, manifolds.Sphere(1.0))[1].norm().item() for h in hs]
    slope = np.polyfit(np.log(hs), np.log(sizes), 1)[0]
    assert slope == pytest.approx(tableau.error_order + 1, abs=0.3), sizes


@pytest.mark.parametrize("method", ["midpoint", "heun", "rk4"])
def test_strict_mode_removes_a_normal_part_that_costs_relaxed_mode_its_order(method):
    # On |x| = r the field below projects to (1 + sin t) A x; off the sphere its tangent part
    # scales with |x|^2, so relaxed stages (which leave the sphere) see the wrong speed.
    radius = 2.0
    a = skew(D)
    x0 = manifolds.Sphere(radius).projx(torch.randn(D, dtype=F64))
    exact = torch.linalg.matrix_exp((T + 1 - math.cos(T)) * a) @ x0

    def f(t, x):
        speed = x.pow(2).sum(-1, keepdim=True) / radius**2
        return speed * (1 + torch.sin(t)) * (x @ a.T) + 0.5 * x

    steps = STEPS[ORDER[method]]
    orders = {
        mode: fitted_order(steps, end_errors(f, x0, exact, method, manifolds.Sphere(radius), mode, steps))
        for mode in ("strict", "relaxed")
    }
    assert orders["strict"] == pytest.approx(ORDER[method], abs=0.3)
    assert orders["relaxed"] < 1.5


@pytest.mark.parametrize("step_size, expected", [(0.05, 2), (0.1, 1), (1e-4, 1000)])
def test_float32_output_times_give_the_float64_step_grid(step_size, expected):
    # 0.1 in float32 is 0.10000000149: it must not cost an extra step per output interval.
    for dtype in (torch.float32, F64):
        sol = solvers.integrate(
            lambda t, x: -x, torch.ones(2, dtype=dtype), torch.tensor([0.0, 0.1], dtype=dtype),
            solver=solvers.RungeKutta(solvers.EULER), controller=solvers.ConstantStepSize(step_size),
        )
        assert sol.stats.steps == expected
