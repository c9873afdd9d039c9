"""Dense output: adaptive solves read output times off each step's continuous extension."""

import math

import numpy as np
import pytest
import torch

import manifolds
import solvers

F64 = torch.float64
SPHERE = manifolds.Sphere(1.0)


def rotation():
    torch.manual_seed(3)
    a = torch.randn(3, 3, dtype=F64)
    return a - a.T


def exact(a, x0, t):
    return x0 @ torch.linalg.matrix_exp(t * a).T


def test_dopri5s_interpolant_has_local_error_of_order_five_on_the_sphere():
    a = rotation()
    field = lambda t, x: x @ a.T + 0.3 * torch.sin(3 * x)  # noqa: E731  (strict mode projects it)
    x0 = SPHERE.projx(torch.tensor([1.0, 0.5, -0.2], dtype=F64))
    solver = solvers.make_solver("dopri5")
    reference = lambda s, h: solvers.odeint(field, x0, [0.0, s * h], method="rk4", manifold=SPHERE,  # noqa: E731
                                            options={"step_size": h / 400})[-1]
    hs, errors = [0.4, 0.2, 0.1, 0.05], []
    for h in hs:
        result = solver.step(field, 0.0, x0, h, SPHERE)
        inside = SPHERE.projx(result.interpolant(0.3))
        assert abs(inside.norm().item() - 1) < 1e-14
        errors.append((inside - reference(0.3, h)).norm().item())
    order = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert order > 4.5, (order, errors)  # quartic extension: O(h^5) locally


def test_many_output_times_cost_no_more_steps_and_stay_on_the_sphere():
    a = rotation()
    x0 = SPHERE.projx(torch.randn(5, 3, dtype=F64))
    t = torch.linspace(0, 10, 1000, dtype=F64)
    few, many = solvers.SolveStats(), solvers.SolveStats()
    solvers.odeint(lambda t, x: x @ a.T, x0, t[[0, -1]], manifold=SPHERE, options={"stats": few})
    ys = solvers.odeint(lambda t, x: x @ a.T, x0, t, manifold=SPHERE, options={"stats": many})
    assert many.nfe == few.nfe  # the 998 outputs in between cost no evaluation
    assert (ys.norm(dim=-1) - 1).abs().max() < 1e-14
    want = torch.stack([exact(a, x0, s) for s in t])
    assert (ys - want).abs().max() < 1e-6  # rtol 1e-7 over 10 time units


class NoDenseOutput:
    """dopri5 without its dense output: the loop must land on every output time instead."""

    def __init__(self):
        self.solver = solvers.make_solver("dopri5")
        self.order, self.error_order, self.fsal, self.strict = 5, 4, True, True

    def field_value(self, *args):
        return self.solver.field_value(*args)

    def step(self, *args):
        return self.solver.step(*args)._replace(interpolant=None)


def test_a_solver_without_dense_output_lands_on_every_output_time():
    a = rotation()
    x0 = SPHERE.projx(torch.randn(3, dtype=F64))
    t = torch.linspace(0, 2, 50, dtype=F64)
    sol = solvers.integrate(lambda t, x: x @ a.T, x0, t, solver=NoDenseOutput(), manifold=SPHERE,
                            controller=solvers.PIController())
    assert sol.stats.steps >= 49  # one step end per output at least
    want = torch.stack([exact(a, x0, s) for s in t])
    assert (sol.ys - want).abs().max() < 1e-6
    assert isinstance(NoDenseOutput(), solvers.AdaptiveSolver)  # the contract, met by a user's class


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_interpolated_outputs_are_differentiable(gradient):
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    x0 = SPHERE.projx(torch.randn(3, dtype=F64))
    t = torch.linspace(0, 1, 7, dtype=F64)

    def loss(w):
        ys = solvers.odeint(lambda t, x: torch.tanh(x @ w.T), x0, t, manifold=SPHERE, rtol=1e-9, atol=1e-11,
                            options={"gradient": gradient})
        return ys[1:-1].sum()

    (grad,) = torch.autograd.grad(loss(w), w)
    eps = 1e-6
    for i, j in [(0, 1), (2, 0)]:
        e = torch.zeros_like(w)
        e[i, j] = eps
        fd = (loss(w + e) - loss(w - e)).item() / (2 * eps)
        assert math.isclose(grad[i, j].item(), fd, rel_tol=1e-4, abs_tol=1e-7)


def test_the_dense_output_benchmark_runs_and_reports_its_ratios(tmp_path):
    from experiments import bench_dense_output

    rows = bench_dense_output.main(["--out", str(tmp_path), "--outputs", "200"])
    text = (tmp_path / "dense_output_bench.md").read_text()
    assert "NFE / torchdiffeq" in text and "At equal or lower error" in text
    by = {(r["rtol"], r["solver"]): r for r in rows}
    for rtol in (1e-5, 1e-6, 1e-7):  # dense output never costs more evaluations than landing
        assert by[rtol, "ours (dense output)"]["nfe"] < by[rtol, "ours (landing)"]["nfe"]
