"""``LowRankSphereAction``'s RKMK frames: the dense ``SphereAction``'s results, with few operations.

An RKMK step on the sphere works in coordinates of the span of its point and field values
(``_SpanFrame``), or with so(3) as R^3 on the 2-sphere (``_CrossFrame``), and applies ``exp`` by a
Taylor polynomial at the degree that keeps it within rounding (``matrix_exp`` past a norm, or under
``torch.compile``). RKMK4 takes Munthe-Kaas and Owren's form of the classic tableau (two brackets).
These tests hold both frames to the dense action in float64 (solves and gradients, with batch
dimensions or none, at the Taylor degree and past it, through that form and through the general
``dexpinv`` one), give RKMK4 its order on the 2-sphere and on a nonlinear field in higher
dimension, check that the two forms of RKMK4 differ by O(h^5) per step, keep float32 states on
the sphere, and bound the number of tensor operations a step issues: on CPU that count, not the
arithmetic, is what a small state's step costs.
"""

import collections

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import manifolds
import solvers
from manifolds import lie

F64 = torch.float64
RADIUS = 2.5


class Field(nn.Module):
    """A nonlinear field with a normal part and parameters: ``3 tanh(W x + b) (1 + t)``."""

    def __init__(self, dim: int, dtype=F64):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim, dtype=dtype) / dim**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, dtype=dtype))

    def forward(self, t, x):
        return 3.0 * torch.tanh(x @ self.w.T + self.b) * (1 + t)


def solve_and_grads(action, shape, tableau, steps=4, seed=0):
    torch.manual_seed(seed)
    sphere = action.manifold
    field = Field(shape[-1])
    z = torch.randn(*shape, dtype=F64, requires_grad=True)
    ys = solvers.integrate(field, sphere.projx(z), torch.tensor([0.0, 1.0], dtype=F64),
                           solver=solvers.RKMK(tableau, action), manifold=sphere,
                           controller=solvers.ConstantStepSize(steps=steps)).ys
    grads = torch.autograd.grad(ys.pow(3).sum(), (z, field.w, field.b))
    return ys[-1].detach(), grads


def assert_same(action_a, action_b, shape, tableau, steps=4, atol=1e-12):
    (ya, ga), (yb, gb) = (solve_and_grads(a, shape, tableau, steps) for a in (action_a, action_b))
    torch.testing.assert_close(yb, ya, rtol=0, atol=atol)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=0, atol=atol * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3), (3,), (4, 5), (2, 3, 8), (6,)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tableau", [solvers.EULER, solvers.HEUN, solvers.BOSH3, solvers.RK4], ids=lambda tab: tab.name)
def test_frames_give_the_dense_actions_solves_and_gradients(shape, tableau):
    # BOSH3 (order 3) steps through dexpinv with one bracket per stage, RK4 through two per step.
    sphere = manifolds.Sphere(RADIUS)
    assert_same(manifolds.SphereAction(sphere), manifolds.LowRankSphereAction(sphere), shape, tableau)


@pytest.mark.parametrize("dim", [3, 6])
def test_frames_past_the_taylor_range_use_matrix_exp_and_still_match(dim, monkeypatch):
    sphere = manifolds.Sphere(RADIUS)
    calls = []
    matrix_exp = torch.linalg.matrix_exp
    monkeypatch.setattr(torch.linalg, "matrix_exp", lambda a: calls.append(a.shape) or matrix_exp(a))
    assert_same(manifolds.SphereAction(sphere), manifolds.LowRankSphereAction(sphere), (4, dim), solvers.RK4)
    dense_calls = len(calls)
    calls.clear()
    monkeypatch.setattr(lie, "_TAYLOR_MAX_NORM", -1.0)  # every move past the Taylor range
    assert_same(manifolds.SphereAction(sphere), manifolds.LowRankSphereAction(sphere), (4, dim), solvers.RK4)
    assert len(calls) == 2 * dense_calls  # the dense action's and the frame's, one per move each


def test_frames_call_no_matrix_exponential_for_ordinary_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.linalg, "matrix_exp", lambda a: calls.append(a) or pytest.fail("matrix_exp"))
    sphere = manifolds.Sphere(1.0)
    for dim in (3, 64):
        x0 = sphere.projx(torch.randn(16, dim))
        a = torch.randn(dim, dim) / dim**0.5
        skew = a - a.T
        solvers.odeint(lambda t, x, skew=skew: x @ skew.T, x0, torch.tensor([0.0, 1.0]), method="rkmk4",
                       manifold=sphere, options={"steps": 20})
    assert not calls


def test_a_zero_field_leaves_the_state_and_finite_gradients():
    sphere = manifolds.Sphere(1.0)
    for dim in (3, 6):
        x0 = sphere.projx(torch.randn(4, dim, dtype=F64)).requires_grad_()
        y = solvers.odeint(lambda t, x: 0.0 * x, x0, torch.tensor([0.0, 1.0], dtype=F64), method="rkmk4",
                           manifold=sphere, options={"steps": 2})[-1]
        torch.testing.assert_close(y, x0, rtol=0, atol=1e-15)
        assert torch.isfinite(torch.autograd.grad(y.sum(), x0)[0]).all()


def test_checkpointed_gradients_equal_backprop_through_the_frames():
    sphere = manifolds.Sphere(RADIUS)
    for dim in (3, 6):
        grads = []
        for gradient in ("backprop", "checkpoint"):
            torch.manual_seed(2)
            field = Field(dim)
            z = torch.randn(3, dim, dtype=F64, requires_grad=True)
            y = solvers.integrate(field, sphere.projx(z), torch.tensor([0.0, 1.0], dtype=F64),
                                  solver=solvers.make_solver("rkmk4", sphere), manifold=sphere,
                                  controller=solvers.ConstantStepSize(steps=5), gradient=gradient).ys[-1]
            grads.append(torch.autograd.grad(y.pow(3).sum(), (z, field.w)))
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,order", [("rkmk2", 2), ("rkmk4", 4)])
def test_rkmk_has_its_order_on_the_2_sphere(method, order):
    # dx/dt = (1 + sin t) A x: commuting generators, solution expm((t + 1 - cos t) A) x0.
    torch.manual_seed(0)
    a = torch.randn(3, 3, dtype=F64)
    a = a - a.T
    x0 = manifolds.Sphere(RADIUS).projx(torch.randn(3, dtype=F64))
    exact = torch.linalg.matrix_exp((2 - np.cos(1.0)) * a) @ x0
    steps = (8, 16, 32, 64, 128) if order == 2 else (4, 8, 16, 32, 64)
    errors = [(solvers.odeint(lambda t, x: (1 + torch.sin(t)) * (x @ a.T), x0, torch.tensor([0.0, 1.0], dtype=F64),
                              method=method, manifold=manifolds.Sphere(RADIUS), options={"steps": n})[-1] - exact)
              .norm().item() for n in steps]
    slope = np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(errors), 1)[0]
    assert slope == pytest.approx(order, abs=0.3), errors


@pytest.mark.parametrize("dim", [3, 5])
def test_rkmk4_has_order_4_on_a_nonlinear_field(dim):
    # Non-commuting generators (the field's tanh), against the same method at 4096 steps.
    torch.manual_seed(1)
    field = Field(dim)
    sphere = manifolds.Sphere(RADIUS)
    x0 = sphere.projx(torch.randn(2, dim, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def solve(steps):
        return solvers.odeint(field, x0, t, method="rkmk4", manifold=sphere, options={"steps": steps})[-1]

    with torch.no_grad():
        reference = solve(4096)
        steps = (16, 32, 64, 128)
        errors = [(solve(n) - reference).norm().item() for n in steps]
    slope = np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(errors), 1)[0]
    assert slope == pytest.approx(4, abs=0.3), errors


@pytest.mark.parametrize("make", ["sphere", "low_rank_sphere", "so3"])
def test_the_two_forms_of_rkmk4_differ_by_order_5_per_step(make):
    # Munthe-Kaas and Owren's two brackets against dexpinv truncated after ad^2 at every stage:
    # the same method to order 4, so one step from the same point differs by O(h^5). (On SO(3)
    # either bracket left out makes the gap O(h^4); on the sphere its generators hide that.)
    torch.manual_seed(3)
    if make == "so3":
        action = manifolds.StiefelAction(manifolds.SpecialOrthogonal())
        x = action.manifold.random(3, 3, dtype=F64)
    else:
        sphere = manifolds.Sphere(RADIUS)
        action = (manifolds.SphereAction if make == "sphere" else manifolds.LowRankSphereAction)(sphere)
        x = sphere.projx(torch.randn(3, 5, dtype=F64))
    field = Field(x.shape[-1])
    solver = solvers.RKMK(solvers.RK4, action)
    sizes, gaps = (0.1, 0.05, 0.025), []
    with torch.no_grad():
        for h in sizes:
            ends = []
            for stages in (solver._rk4_stages, solver._stages):
                frame = action.frame(x, 4)
                k1 = frame.generator(frame.base, field(torch.tensor(0.0, dtype=F64), x))
                ends.append(frame.point(frame.move(stages(field, 0.0, F64, h, frame, k1))))
            gaps.append((ends[0] - ends[1]).norm().item())
    slope = np.polyfit(np.log(sizes), np.log(gaps), 1)[0]
    assert slope == pytest.approx(5, abs=0.4), gaps


def test_float32_states_stay_on_the_2_sphere():
    torch.manual_seed(0)
    a = torch.randn(3, 3)
    w = torch.randn(3, 3)
    field = lambda t, x: x @ (a - a.T).T + torch.tanh(x @ w.T)  # noqa: E731
    sphere = manifolds.Sphere(3.0)
    ys = solvers.odeint(field, sphere.projx(torch.randn(8, 3)), torch.linspace(0, 20.0, 5), method="rkmk4",
                        manifold=sphere, options={"step_size": 0.01})
    assert ys.dtype == torch.float32
    assert (ys.norm(dim=-1) - 3.0).abs().max() <= 1e-5


@pytest.mark.parametrize("dim", [3, 6])
def test_a_step_compiles_without_graph_breaks(dim):
    # Under torch.compile the Taylor degree (data-dependent) gives way to matrix_exp.
    torch._dynamo.reset()
    sphere = manifolds.Sphere(1.0)
    a = torch.randn(dim, dim, dtype=F64)
    solver = solvers.RKMK(solvers.RK4, manifolds.LowRankSphereAction(sphere))
    step = lambda x: solver.step(lambda t, x: x @ (a - a.T).T, 0.0, x, 0.1, sphere).y  # noqa: E731
    x0 = sphere.projx(torch.randn(4, dim, dtype=F64))
    explained = torch._dynamo.explain(step)(x0)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(torch.compile(step, backend="eager", fullgraph=True)(x0), step(x0), rtol=0, atol=1e-14)


def test_taylor_degree_bounds_the_tail_of_the_value_and_its_derivative():
    for dtype in (torch.float32, torch.float64):
        tol = 0.25 * torch.finfo(dtype).eps
        previous = 0
        for norm in (0.0, 1e-3, 0.05, 0.2, 0.7, 1.5, 2.0):
            m = lie._taylor_degree(norm, dtype)
            tail = sum(norm**j / np.prod(np.arange(1, j + 1, dtype=float)) for j in range(m, m + 60))
            assert tail <= tol and m >= previous
            previous = m
        assert lie._taylor_degree(2.01, dtype) is None and lie._taylor_degree(float("nan"), dtype) is None


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step_ops(solver, dim: int, backward: bool) -> collections.Counter:
    torch.manual_seed(0)
    sphere = manifolds.Sphere(1.0)
    a = torch.randn(dim, dim) / dim**0.5
    x = sphere.projx(torch.randn(256, dim)).requires_grad_(backward)
    solver.step(lambda t, x: x @ (a - a.T).T, 0.0, x, 0.02, sphere)  # constants made once
    with _Count() as count:
        y = solver.step(lambda t, x: x @ (a - a.T).T, 0.0, x, 0.02, sphere).y
        if backward:
            y.sum().backward()
    return count.ops


@pytest.mark.parametrize("dim,bound", [(3, 2.2), (64, 5.2)])
def test_an_rkmk4_step_issues_a_bounded_multiple_of_rk4s_operations(dim, bound):
    # The cost of a small state's step on CPU: about the count of tensor operations (views
    # included; now ~1.6x rk4's forward and ~2.1x with backward for d = 3, ~4.4x and ~4.9x for
    # d = 64, many of them views), and no matrix exponential (before the frames: four of a
    # (k + 1) x (k + 1) block per step, k up to 8, each costing more than a whole rk4 step).
    rkmk4 = solvers.RKMK(solvers.RK4, manifolds.LowRankSphereAction(manifolds.Sphere(1.0)))
    for backward in (False, True):
        ours, reference = step_ops(rkmk4, dim, backward), step_ops(solvers.RungeKutta(solvers.RK4), dim, backward)
        assert not {"linalg_matrix_exp", "bmm"} & set(ours)
        assert sum(ours.values()) <= bound * sum(reference.values()), (sum(ours.values()), sum(reference.values()))
