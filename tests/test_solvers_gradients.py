"""Gradients through every solver are right: gradcheck in float64, and the adjoint agrees.

``torch.autograd.gradcheck`` compares autograd against finite differences through every method in
"backprop" and "checkpoint" modes, w.r.t. the initial point and a field parameter (RKMK on
``odeint``'s ``LowRankSphereAction``, whose gradients equal the dense ``SphereAction``'s). The continuous
adjoint (``solvers.odeint_adjoint``) matches finite differences of a tight solve, agrees with
backprop up to the solver's error (and the gap shrinks at the method's order), and is refused
where it is not sound.
"""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import manifolds
import solvers

F64 = torch.float64
RADIUS = 1.5
SPHERE = manifolds.Sphere(RADIUS)
T = torch.tensor([0.0, 0.4, 1.0], dtype=F64)


class TanhField(nn.Module):
    """``f(t, x) = tanh(x W^T) + t b``: nonlinear, time-dependent, with parameters to differentiate."""

    def __init__(self, d: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d, dtype=F64))
        self.b = nn.Parameter(torch.randn(d, dtype=F64))

    def forward(self, t, x):
        return torch.tanh(x @ self.w.T) + t * self.b


def solve_fn(field: TanhField, method: str, gradient: str):
    """``(z, w) -> solution`` with ``y0 = projx(z)``, so finite differences stay on the sphere."""
    options = {"gradient": gradient}
    if method not in ("bosh3", "dopri5"):
        options["steps"] = 4

    def fn(z, w):
        # The field with gradcheck's perturbed tensor in place of its parameter W.
        f = lambda t, x: functional_call(field, {"w": w}, (t, x))  # noqa: E731
        # Tight enough that the (undifferentiated) step-size choices move the output by < 1e-7.
        return solvers.odeint(f, SPHERE.projx(z), T, method=method, manifold=SPHERE,
                              rtol=1e-8, atol=1e-10, options=options)

    return fn


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
@pytest.mark.parametrize("method", solvers.METHODS)
def test_gradcheck_through_every_method(method, gradient):
    field = TanhField()
    z = torch.randn(3, dtype=F64, requires_grad=True)
    w = field.w.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(solve_fn(field, method, gradient), (z, w), atol=1e-6, rtol=1e-4, fast_mode=True)


def test_checkpoint_gives_the_same_gradient_as_backprop():
    grads = {}
    for gradient in ("backprop", "checkpoint"):
        torch.manual_seed(1)
        field = TanhField()
        z = torch.randn(3, dtype=F64, requires_grad=True)
        out = solvers.odeint(field, SPHERE.projx(z), T, method="rk4", manifold=SPHERE,
                             options={"steps": 8, "gradient": gradient})
        out.pow(2).sum().backward()
        grads[gradient] = torch.cat([z.grad, field.w.grad.flatten(), field.b.grad])
    torch.testing.assert_close(grads["checkpoint"], grads["backprop"], rtol=1e-12, atol=1e-12)


def test_checkpointed_solve_counts_only_its_own_evaluations():
    field = TanhField()
    z = torch.randn(3, dtype=F64, requires_grad=True)
    solution = solvers.integrate(field, SPHERE.projx(z), T, solver=solvers.make_solver("rk4"), manifold=SPHERE,
                                 controller=solvers.ConstantStepSize(steps=8), gradient="checkpoint")
    assert solution.stats.nfe == 2 * 8 * 4
    solution.ys.pow(2).sum().backward()  # reruns the steps through the same field
    assert solution.stats.nfe == 2 * 8 * 4 and z.grad is not None


def test_two_level_checkpointing_of_no_steps_is_the_identity():
    x = torch.randn(3)
    out, count = solvers.checkpointed_steps(lambda i, x: (x + 1, 1), x, 0)
    assert out is x and count == 0


@pytest.mark.parametrize("n", [7, 10, 64])
def test_two_level_checkpointing_keeps_one_state_per_segment(n):
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    x0 = torch.randn(3, dtype=F64, requires_grad=True)
    step = lambda i, x: (torch.tanh(x @ w.T) + 0.1 * i, 2)  # noqa: E731
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, count = solvers.checkpointed_steps(step, x0, n)
    assert count == 2 * n  # counted once, in the forward pass
    size = math.ceil(math.sqrt(n))
    assert len(saved) == math.ceil(n / size)  # the segments' inputs, not one state per step
    x = x0
    for i in range(n):
        x = step(i, x)[0]
    for got, want in zip(torch.autograd.grad(out.sum(), (x0, w)), torch.autograd.grad(x.sum(), (x0, w))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_low_rank_sphere_action_gives_the_dense_actions_gradients():
    grads = []
    for action in (manifolds.SphereAction(SPHERE), manifolds.LowRankSphereAction(SPHERE)):
        torch.manual_seed(1)
        field = TanhField(5)
        z = torch.randn(2, 5, dtype=F64, requires_grad=True)
        ys = solvers.integrate(field, SPHERE.projx(z), T, solver=solvers.RKMK(solvers.RK4, action), manifold=SPHERE,
                               controller=solvers.ConstantStepSize(steps=4)).ys
        ys.pow(3).sum().backward()
        grads.append(torch.cat([z.grad.flatten(), field.w.grad.flatten(), field.b.grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)


def adjoint_fn(field: TanhField, method: str, options: dict, tol: float):
    def fn(z, w, b):
        f = lambda t, x: functional_call(field, {"w": w, "b": b}, (t, x))  # noqa: E731
        return solvers.odeint_adjoint(f, SPHERE.projx(z), T, method=method, manifold=SPHERE,
                                      rtol=tol, atol=tol, options=options, adjoint_params=(w, b))

    return fn


@pytest.mark.parametrize(
    "method, options, tol",
    [("dopri5", {}, 1e-10), ("bosh3", {}, 1e-8), ("rk4", {"step_size": 0.01}, 1e-10)],  # rk4 ignores tol
)
def test_adjoint_matches_finite_differences(method, options, tol):
    # The adjoint differentiates the exact flow; these forward solves are within ~1e-8 of it.
    field = TanhField()
    inputs = (
        torch.randn(3, dtype=F64, requires_grad=True),
        field.w.detach().clone().requires_grad_(True),
        field.b.detach().clone().requires_grad_(True),
    )
    fn = adjoint_fn(field, method, options, tol)
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-4, fast_mode=True)


def gradients(method: str, adjoint: bool, steps: int) -> torch.Tensor:
    """Gradient of a loss w.r.t. (z, W, b) through ``method`` with ``steps`` per output interval."""
    torch.manual_seed(1)
    field = TanhField()
    z = torch.randn(3, dtype=F64, requires_grad=True)
    solve = solvers.odeint_adjoint if adjoint else solvers.odeint
    out = solve(field, SPHERE.projx(z), T, method=method, manifold=SPHERE, options={"steps": steps})
    out.pow(3).sum().backward()
    return torch.cat([z.grad, field.w.grad.flatten(), field.b.grad])


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_adjoint_agrees_with_backprop_up_to_the_solver_error(method, order):
    gaps = [(gradients(method, True, n) - gradients(method, False, n)).abs().max().item() for n in (8, 16)]
    # Both gradients converge to the exact one at the method's order, so their gap does too.
    assert gaps[0] / gaps[1] == pytest.approx(2**order, rel=0.3), gaps
    if method == "rk4":
        assert gaps[1] < 1e-6


def test_adjoint_refuses_relaxed_mode_and_lie_group_methods():
    field, y0 = TanhField(), SPHERE.projx(torch.randn(3, dtype=F64))
    with pytest.raises(ValueError, match="Runge-Kutta solver in strict mode.*mode='relaxed'"):
        solvers.odeint_adjoint(field, y0, T, method="rk4", manifold=SPHERE, options={"mode": "relaxed"})
    for method in ("rkmk2", "rkmk4"):
        with pytest.raises(ValueError, match="Runge-Kutta solver in strict mode.*got RKMK"):
            solvers.odeint_adjoint(field, y0, T, method=method, manifold=SPHERE)
    with pytest.raises(ValueError, match="computes its own gradients"):
        solvers.odeint_adjoint(field, y0, T, manifold=SPHERE, options={"gradient": "checkpoint"})


def test_a_single_output_time_returns_the_start():
    x0 = manifolds.Sphere(1.0).projx(torch.randn(3, dtype=F64))
    for method in ("rk4", "dopri5"):
        ys = solvers.odeint(lambda t, x: x.roll(1, -1), x0, torch.tensor([0.5], dtype=F64), method=method,
                            manifold=manifolds.Sphere(1.0))
        assert ys.shape == (1, 3) and torch.equal(ys[0], x0)


def test_the_adjoint_leaves_frozen_parameters_alone_and_reads_a_modules_parameters_through_a_tuple():
    sphere = manifolds.Sphere(1.0)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(3, 3, dtype=F64))
            self.frozen = torch.nn.Parameter(torch.randn(3, 3, dtype=F64), requires_grad=False)

        def forward(self, t, x):
            return torch.tanh(x @ self.a.T) + x @ self.frozen.T

    field, x0 = Field(), sphere.projx(torch.randn(3, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    solvers.odeint_adjoint(field, x0, t, method="rk4", manifold=sphere, options={"steps": 8})[-1].sum().backward()
    adjoint = field.a.grad.clone()
    field.a.grad = None
    solvers.odeint(field, x0, t, method="rk4", manifold=sphere, options={"steps": 8})[-1].sum().backward()
    torch.testing.assert_close(adjoint, field.a.grad, rtol=0, atol=1e-3)  # rk4 at h = 1/8: the flows' gap
    assert field.frozen.grad is None

    class TupleField(torch.nn.Module):  # a module on a tuple state: its parameters are found as on a tensor
        def __init__(self):
            super().__init__()
            self.inner = field

        def forward(self, t, y):
            x, s = y
            return self.inner(t, x), (x * x).sum(-1, keepdim=True)

    field.a.grad = None
    ys = solvers.odeint_adjoint(TupleField(), (x0, torch.zeros(1, dtype=F64)), t, method="rk4",
                                manifold=(sphere, None), options={"steps": 8})
    ys[0][-1].sum().backward()
    assert field.a.grad is not None and torch.isfinite(field.a.grad).all()
