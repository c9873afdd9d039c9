"""Adaptive solves do what their tolerances and statistics say, and fail loudly, never silently.

The error against the exact solution falls as rtol falls; the NFE the stats report is the number
of times the field really ran; rejected steps are counted; outputs at requested times are on the
manifold and at those exact times; a field that blows up in finite time, or returns NaN, ends in
``StepSizeError`` naming the time and step size; the NFE cap raises ``StepSizeError`` too.
"""

import math
import re

import pytest
import torch

import manifolds
import solvers

F64 = torch.float64
ADAPTIVE = ["bosh3", "dopri5"]


class CountingRotation:
    """``dx/dt = speed(t) A x`` on a sphere, counting its own calls.

    ``speed`` is 1, or 1 before ``t = kink`` and 10 after it (a sudden change that makes steps
    sized for the slow part fail).
    """

    def __init__(self, d: int = 4, kink: float | None = None, dtype=F64):
        a = torch.randn(d, d, dtype=dtype)
        self.a = (a - a.T) / 2
        self.kink = kink
        self.calls = 0

    def speed(self, t: float) -> float:
        return 1.0 if self.kink is None or t < self.kink else 10.0

    def angle(self, t: float) -> float:
        """``int_0^t speed``."""
        return t if self.kink is None or t < self.kink else self.kink + 10.0 * (t - self.kink)

    def __call__(self, t, x):
        self.calls += 1
        return self.speed(float(t)) * (x @ self.a.T)

    def exact(self, x0, t: float):
        return torch.linalg.matrix_exp(self.angle(t) * self.a) @ x0


def sphere_start(radius: float, d: int = 4, dtype=F64):
    return manifolds.Sphere(radius).projx(torch.randn(d, dtype=dtype))


@pytest.mark.parametrize("method", ADAPTIVE)
def test_error_falls_as_rtol_falls(method):
    field, x0 = CountingRotation(), sphere_start(2.0)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    errors, nfes = [], []
    for rtol in (1e-3, 1e-5, 1e-7, 1e-9):
        stats = solvers.SolveStats()
        ys = solvers.odeint(field, x0, t, method=method, manifold=manifolds.Sphere(2.0),
                            rtol=rtol, atol=rtol, options={"stats": stats})
        errors.append((ys[-1] - field.exact(x0, 3.0)).norm().item())
        nfes.append(stats.nfe)
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert all(n1 > n0 for n0, n1 in zip(nfes, nfes[1:])), nfes
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("method", ADAPTIVE)
def test_stats_count_the_real_field_calls_and_the_rejected_steps(method):
    # The kink at t = 1 makes the step that crosses it fail: rejections happen.
    field, x0 = CountingRotation(kink=1.0), sphere_start(1.0)
    stats = solvers.SolveStats()
    ys = solvers.odeint(field, x0, torch.tensor([0.0, 2.0], dtype=F64), method=method,
                        manifold=manifolds.Sphere(1.0), rtol=1e-6, atol=1e-8, options={"stats": stats})
    tableau = solvers.make_solver(method).tableau
    assert stats.nfe == field.calls
    assert stats.rejected > 0
    # One evaluation at t0, one for the starting step, then stages - 1 per attempt (FSAL).
    assert stats.nfe == 2 + (tableau.stages - 1) * (stats.steps + stats.rejected)
    assert (ys[-1] - field.exact(x0, 2.0)).norm() < 1e-4


def test_integrate_reports_the_same_stats_as_the_options_dict():
    field, x0 = CountingRotation(), sphere_start(1.0)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = solvers.integrate(field, x0, t, solver=solvers.RungeKutta(solvers.DOPRI5),
                            manifold=manifolds.Sphere(1.0), controller=solvers.PIController(rtol=1e-7, atol=1e-9))
    stats = solvers.SolveStats()
    solvers.odeint(field, x0, t, method="dopri5", manifold=manifolds.Sphere(1.0), options={"stats": stats})
    assert sol.stats == stats
    assert sol.stats.nfe > 0 and sol.stats.steps > 0


@pytest.mark.parametrize("method", ADAPTIVE)
def test_outputs_at_requested_times_are_on_the_manifold_at_those_times(method):
    radius = 1.5
    field, x0 = CountingRotation(d=6), sphere_start(radius, d=6)
    t = torch.linspace(0, 5.0, 23, dtype=F64)
    ys = solvers.odeint(field, x0, t, method=method, manifold=manifolds.Sphere(radius), rtol=1e-8, atol=1e-10)
    assert ys.shape == (23, 6)
    assert ((ys.norm(dim=-1) - radius).abs() < 1e-12).all()
    exact = torch.stack([field.exact(x0, ti) for ti in t.tolist()])
    assert (ys - exact).norm(dim=-1).max() < 1e-5


def blow_up(t, x):
    """``dx/dt = x^2``: from ``x(0) = 1`` the solution ``1 / (1 - t)`` blows up at ``t = 1``."""
    return x * x


def failure_time(message: str) -> float:
    return float(re.search(r"at t=([-+0-9.e]+)", message).group(1))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_finite_time_blow_up_raises_step_size_error_at_the_blow_up(method, dtype, deadline):
    deadline(30)
    with pytest.raises(solvers.StepSizeError, match=r"step size [0-9.e+-]+ fell below dt_min.* at t=.*NFE \d+") as info:
        solvers.odeint(blow_up, torch.ones(3, dtype=dtype), torch.tensor([0.0, 2.0], dtype=dtype),
                       method=method, rtol=1e-6, atol=1e-6)
    assert failure_time(str(info.value)) == pytest.approx(1.0, abs=1e-3)


def test_a_field_that_turns_nan_is_never_accepted(deadline):
    deadline(30)

    def field(t, x):
        return x * torch.sqrt(1.25 - t)  # NaN once t > 1.25

    # Named as a NaN, where it starts, after a few dozen evaluations: not a step-size failure at the cap.
    stats = solvers.SolveStats()
    with pytest.raises(solvers.NonFiniteError, match="came back non-finite") as info:
        solvers.odeint(field, torch.ones(3, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method="dopri5",
                       options={"stats": stats})
    assert failure_time(str(info.value)) == pytest.approx(1.25, abs=1e-3)
    assert int(re.search(r"NFE (\d+)", str(info.value)).group(1)) < 500


def test_a_field_that_is_nan_at_the_start_is_named_at_once():
    calls = []

    def field(t, x):
        calls.append(t)
        return x * float("nan")

    with pytest.raises(solvers.NonFiniteError, match="the field is non-finite at t=0, where the solve"):
        solvers.odeint(field, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert len(calls) == 1


def test_nfe_cap_raises_step_size_error():
    with pytest.raises(solvers.StepSizeError, match=r"NFE cap 50 reached at t=[0-9.]+ with step size"):
        solvers.odeint(blow_up, torch.ones(3, dtype=F64), torch.tensor([0.0, 0.9], dtype=F64),
                       method="dopri5", options={"max_nfe": 50})


def test_backward_in_time_solves_recover_the_start():
    field, x0 = CountingRotation(), sphere_start(1.0)
    sphere = manifolds.Sphere(1.0)
    forward = solvers.odeint(field, x0, torch.tensor([0.0, 2.0], dtype=F64), method="dopri5", manifold=sphere)
    back = solvers.odeint(field, forward[-1], torch.tensor([2.0, 0.0], dtype=F64), method="dopri5", manifold=sphere)
    assert (back[-1] - x0).norm() < 1e-6
    assert math.isclose(back[-1].norm().item(), 1.0, abs_tol=1e-12)
