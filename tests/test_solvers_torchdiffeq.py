"""Cross-checks against torchdiffeq, and the ``manifold_<method>`` plugin inside torchdiffeq.

On a Euclidean manifold our fixed-step methods reproduce torchdiffeq's (Euler, midpoint, Heun, and
classic RK4 from torchdiffeq's own ``rk4_step_func``) to 1e-10 in float64, and our dopri5 at tight
tolerances agrees with torchdiffeq's dopri5 and with the exact solution. After ``import solvers``,
``torchdiffeq.odeint``/``odeint_adjoint`` run our methods on a sphere, with gradients.
"""

import importlib

import geoopt
import pytest
import torch
import torchdiffeq
from torch import nn
from torchdiffeq._impl.rk_common import rk4_step_func

import manifolds
import solvers

F64 = torch.float64
T = torch.linspace(0, 1.0, 5, dtype=F64)  # output times on the h = 0.05 grid


class MLPField(nn.Module):
    """A small time-dependent tanh MLP on R^4 (batch of 3)."""

    def __init__(self, d: int = 4, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.Tanh(), nn.Linear(width, d)).to(F64)

    def forward(self, t, x):
        tt = t.expand(*x.shape[:-1], 1)  # (B, 1)
        return self.net(torch.cat([x, tt], dim=-1))


@pytest.fixture
def y0():
    return torch.randn(3, 4, dtype=F64)


def classic_rk4(field, y0, h: float):
    """torchdiffeq's classic RK4 step (its ``rk4`` method is the 3/8 rule) on our grid."""
    perturbed = lambda t, y, perturb=None: field(t, y)  # noqa: E731
    ys, y = [y0], y0
    n = round(float(T[-1] - T[0]) / h)
    for i in range(n):
        t0 = T[0] + i * h
        y = y + rk4_step_func(perturbed, t0, torch.tensor(h, dtype=F64), t0 + h, y)
        if (i + 1) % (n // (len(T) - 1)) == 0:
            ys.append(y)
    return torch.stack(ys)


@pytest.mark.parametrize("manifold", [None, geoopt.Euclidean(ndim=1)], ids=["none", "euclidean"])
@pytest.mark.parametrize(
    "ours, theirs", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2"), ("rk4", None)]
)
def test_fixed_step_methods_equal_torchdiffeq_on_euclidean_space(ours, theirs, manifold, y0):
    field, h = MLPField(), 0.05
    with torch.no_grad():
        mine = solvers.odeint(field, y0, T, method=ours, manifold=manifold, options={"step_size": h})
        if theirs is None:
            reference = classic_rk4(field, y0, h)
        else:
            reference = torchdiffeq.odeint(field, y0, T, method=theirs, options={"step_size": h})
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-10)


def test_rk4_differs_from_torchdiffeqs_three_eighths_rule_only_by_solver_error(y0):
    field = MLPField()
    with torch.no_grad():
        mine = solvers.odeint(field, y0, T, method="rk4", options={"step_size": 0.05})
        theirs = torchdiffeq.odeint(field, y0, T, method="rk4", options={"step_size": 0.05})
    gap = (mine - theirs).abs().max().item()
    assert 0 < gap < 1e-6


def test_dopri5_agrees_with_torchdiffeq_and_the_exact_solution(y0):
    # A linear field with a non-normal A: exact solution expm(t A) y0.
    a = torch.randn(4, 4, dtype=F64) / 2
    field = lambda t, y: y @ a.T  # noqa: E731
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(ti * a).T for ti in T])
    mine = solvers.odeint(field, y0, T, method="dopri5", rtol=1e-10, atol=1e-12)
    theirs = torchdiffeq.odeint(field, y0, T, method="dopri5", rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-8)


class TangentField(nn.Module):
    """``proju(x, A x + tanh(W x))`` on the sphere of radius 2, with parameters ``A`` and ``W``.

    Tangent by construction, as the plugin's adjoint needs: torchdiffeq's backward pass solves the
    adjoint of the field as given, in R^n.
    """

    def __init__(self, d: int = 4):
        super().__init__()
        self.sphere = manifolds.Sphere(2.0)
        self.a = nn.Parameter(torch.randn(d, d, dtype=F64))
        self.w = nn.Parameter(torch.randn(d, d, dtype=F64) / 2)

    def forward(self, t, x):
        return self.sphere.proju(x, x @ self.a.T + torch.tanh(x @ self.w.T))


def test_plugin_runs_our_methods_inside_torchdiffeq_on_the_sphere():
    solvers.register_torchdiffeq()
    sphere = manifolds.Sphere(2.0)
    field = TangentField()
    y0 = sphere.projx(torch.randn(4, dtype=F64))
    t = torch.linspace(0, 3.0, 7, dtype=F64)
    with torch.no_grad():
        ys = torchdiffeq.odeint(field, y0, t, method="manifold_rk4", options={"manifold": sphere, "step_size": 0.1})
        direct = solvers.odeint(field, y0, t, method="rk4", manifold=sphere, options={"step_size": 0.1})
        drift = torchdiffeq.odeint(field, y0, t, method="rk4", options={"step_size": 0.1})
    assert ((ys.norm(dim=-1) - 2.0).abs() < 1e-12).all()
    torch.testing.assert_close(ys, direct, rtol=0, atol=1e-12)
    assert (drift.norm(dim=-1) - 2.0).abs().max() > 1e-6  # torchdiffeq's own rk4 drifts


def test_plugin_leaves_torchdiffeqs_own_methods_alone():
    registry = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    names = solvers.register_torchdiffeq()
    before = dict(registry)
    assert solvers.register_torchdiffeq() == names  # idempotent
    assert dict(registry) == before
    assert set(names) == {f"manifold_{m}" for m in solvers.METHODS}
    assert registry["rk4"].__module__.startswith("torchdiffeq")


def gradients(solve, **kwargs) -> torch.Tensor:
    torch.manual_seed(1)
    sphere = manifolds.Sphere(2.0)
    field = TangentField()
    y0 = sphere.projx(torch.randn(4, dtype=F64))
    ys = solve(field, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), **kwargs)
    (ys * torch.arange(4, dtype=F64)).sum().backward()
    return torch.cat([field.a.grad.flatten(), field.w.grad.flatten()])


def test_plugin_adjoint_gives_the_gradients_of_our_adjoint_and_of_backprop():
    solvers.register_torchdiffeq()
    sphere = manifolds.Sphere(2.0)
    # torchdiffeq's backward state is its flat augmented vector: a Euclidean method solves it.
    via_torchdiffeq = gradients(
        torchdiffeq.odeint_adjoint, method="manifold_rk4", options={"manifold": sphere, "step_size": 0.01},
        adjoint_method="rk4", adjoint_options={"step_size": 0.01},
    )
    ours = gradients(solvers.odeint_adjoint, method="rk4", manifold=sphere, options={"step_size": 0.01})
    backprop = gradients(solvers.odeint, method="rk4", manifold=sphere, options={"step_size": 0.01})
    assert via_torchdiffeq.abs().max() > 0.1
    # Equal up to rk4's error at h = 0.01: ours projects the (tangent) field a second time, which
    # changes it only at the stages' off-sphere points.
    torch.testing.assert_close(via_torchdiffeq, ours, rtol=0, atol=1e-7)
    torch.testing.assert_close(via_torchdiffeq, backprop, rtol=0, atol=1e-7)


def test_tuple_states_match_torchdiffeq_and_keep_each_part_on_its_manifold():
    torch.manual_seed(2)
    a = torch.randn(3, 3, dtype=F64)
    a = a - a.T
    x0, z0 = torch.randn(4, 3, dtype=F64), torch.zeros(4, 1, dtype=F64)

    def field(t, y):
        x, z = y
        return x @ a.T + 0.1 * torch.tanh(x), (x * x).sum(-1, keepdim=True)

    t = torch.linspace(0, 1, 6, dtype=F64)
    ours = solvers.odeint(field, (x0, z0), t, method="rk4", options={"step_size": 0.05})
    theirs = torchdiffeq.odeint(field, (x0, z0), t, method="rk4", options={"step_size": 0.05})
    assert [o.shape for o in ours] == [(6, 4, 3), (6, 4, 1)]
    for o, th in zip(ours, theirs):  # their rk4 is the 3/8 rule: equal up to fourth-order error
        torch.testing.assert_close(o, th, rtol=0, atol=1e-5)
    sphere = manifolds.Sphere(1.0)
    on = solvers.odeint(field, (sphere.projx(x0), z0), t, manifold=(sphere, None))
    assert (on[0].norm(dim=-1) - 1).abs().max() < 1e-12
    with pytest.raises(ValueError, match="y0 has 2 parts but manifold has 3"):
        solvers.odeint(field, (x0, z0), t, manifold=(sphere, None, None))


def test_torchdiffeq_option_names_work_or_are_refused_with_the_list():
    y0 = torch.ones(3, dtype=F64)
    field = lambda t, y: -y  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=F64)
    stats = solvers.SolveStats()
    solvers.odeint(field, y0, t, options={"first_step": 0.01, "max_num_steps": 1000, "stats": stats})
    assert stats.steps > 0
    for name in ("perturb", "grid_points"):
        with pytest.raises(ValueError, match=rf"unknown options \['{name}'\]; accepted: step_size, steps"):
            solvers.odeint(field, y0, t, options={name: True})
    with pytest.raises(ValueError, match="the first step must be a positive finite size"):
        solvers.odeint(field, y0, t, options={"first_step": -0.1})
    with pytest.raises(ValueError, match="would take [0-9,]{9} steps, more than max_steps=100,000"):
        solvers.odeint(field, y0, t, method="rk4", options={"step_size": 1e-7})
    solvers.register_torchdiffeq()
    with pytest.raises(ValueError, match="needs options=\\{'manifold': M"):
        torchdiffeq.odeint(field, y0, t, method="manifold_rk4")


def test_torchdiffeqs_adjoint_cannot_run_our_methods_backwards_silently():
    # Its backward pass differentiates the field as given, off the manifold (wrong gradients for a
    # field with a normal part), on an augmented state that is no point of the sphere.
    solvers.register_torchdiffeq()
    sphere = manifolds.Sphere(2.0)
    with pytest.raises(ValueError, match="use solvers.odeint_adjoint, which solves the adjoint of the tangent field"):
        gradients(torchdiffeq.odeint_adjoint, method="manifold_rk4", options={"manifold": sphere, "step_size": 0.1})
