"""Bad input gets a clear error before any work, and a NaN mid-solve names its step and time.

Each case checks the message with ``pytest.raises(match=...)`` and, where the error must come
before work, that the field never ran.
"""

import re

import pytest
import torch

import manifolds
import solvers

F64 = torch.float64


class Field:
    """``dx/dt = A x`` on R^3 or a sphere, counting its calls."""

    def __init__(self):
        a = torch.randn(3, 3, dtype=F64)
        self.a = a - a.T
        self.calls = 0

    def __call__(self, t, x):
        self.calls += 1
        return x @ self.a.T


T01 = torch.tensor([0.0, 1.0], dtype=F64)


def test_y0_off_the_manifold_says_by_how_much():
    field, sphere = Field(), manifolds.Sphere(2.0)
    on = sphere.projx(torch.randn(3, dtype=F64))
    off = 1.01 * on
    with pytest.raises(solvers.OffManifoldError, match=r"y0 is not on Sphere.*projx moves it by up to") as info:
        solvers.odeint(field, off, T01, manifold=sphere)
    gap = float(re.search(r"by up to ([0-9][0-9.e+-]*[0-9])", str(info.value)).group(1))
    assert gap == pytest.approx((off - on).abs().max().item(), rel=1e-2)
    assert field.calls == 0


@pytest.mark.parametrize("t", [[0.0, 1.0, 1.0, 2.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.5]])
def test_times_must_be_strictly_monotone(t):
    field = Field()
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        solvers.odeint(field, torch.ones(3, dtype=F64), torch.tensor(t, dtype=F64))
    assert field.calls == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_y0_or_t_is_refused(bad):
    field = Field()
    y0 = torch.tensor([1.0, bad, 0.0], dtype=F64)
    with pytest.raises(solvers.NonFiniteError, match="y0 contains NaN or infinite entries: shape \\(3,\\), "):
        solvers.odeint(field, y0, T01)
    with pytest.raises(ValueError, match="t must be finite"):
        solvers.odeint(field, torch.ones(3, dtype=F64), torch.tensor([0.0, bad], dtype=F64))
    assert field.calls == 0


def test_unknown_method_lists_the_known_ones():
    known = ", ".join(solvers.METHODS)
    with pytest.raises(ValueError, match=re.escape(f"unknown method 'rk5'; known methods: {known}")):
        solvers.odeint(Field(), torch.ones(3, dtype=F64), T01, method="rk5")
    for name in ("euler", "midpoint", "heun", "rk4", "rkmk2", "rkmk4", "bosh3", "dopri5"):
        assert name in solvers.METHODS


def test_a_field_of_the_wrong_shape_is_named_at_its_first_call():
    calls = []

    def field(t, x):
        calls.append(t)
        return x.unsqueeze(-1)

    message = "returned (3, 1) at t=0; it must return a tensor shaped like the state, (3,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        solvers.odeint(field, torch.ones(3, dtype=F64), T01, method="rk4", options={"steps": 10})
    assert len(calls) == 1


def test_a_nan_mid_solve_names_the_step_and_time():
    def field(t, x):
        return x * torch.sqrt(1.25 - t)  # NaN once t > 1.25, i.e. inside step 13 of h = 0.1

    message = "at step 13 (t=1.3, h=0.1): shape (3,), 3 nan and 0 inf; no finite entries"
    with pytest.raises(solvers.NonFiniteError, match=re.escape(message)):
        solvers.odeint(field, torch.ones(3, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                       method="rk4", options={"step_size": 0.1})
    # The check is what catches it: without it the NaN comes back.
    ys = solvers.odeint(field, torch.ones(3, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                        method="rk4", options={"step_size": 0.1, "check_finite": False})
    assert ys[-1].isnan().all()


def test_large_but_finite_states_are_not_flagged():
    # Their sum overflows float32; the finiteness check must not mistake that for a NaN.
    y0 = torch.full((4,), 3e38)
    ys = solvers.odeint(lambda t, x: -x, y0, torch.tensor([0.0, 0.1]), method="euler", options={"steps": 2})
    assert torch.isfinite(ys).all()


def test_other_misuse_is_refused_with_a_reason():
    y0 = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="Lie-group methods need a manifold with an SO\\(n\\) action"):
        solvers.odeint(Field(), y0, T01, method="rkmk4")
    with pytest.raises(ValueError, match="unknown options \\['stepsize'\\]; accepted: step_size"):
        solvers.odeint(Field(), y0, T01, options={"stepsize": 0.1})
    with pytest.raises(TypeError, match="options\\['stats'\\] must be a solvers.SolveStats, .* not bool"):
        solvers.odeint(Field(), y0, T01, options={"stats": True})
    with pytest.raises(ValueError, match="unknown mode 'loose'"):
        solvers.odeint(Field(), y0, T01, options={"mode": "loose"})
    with pytest.raises(ValueError, match="the field is not an nn.Module, so pass them"):
        solvers.odeint(Field(), y0, T01, method="rk4", options={"gradient": "adjoint"})
    with pytest.raises(ValueError, match="dopri5 chooses its own steps"):
        solvers.odeint(Field(), y0, T01, options={"step_size": 0.1})
    with pytest.raises(ValueError, match="has no error estimate; use ConstantStepSize"):
        solvers.integrate(Field(), y0, T01, solver=solvers.RungeKutta(solvers.RK4), controller=solvers.PIController())
    with pytest.raises(ValueError, match="give exactly one of step_size and steps"):
        solvers.ConstantStepSize(step_size=0.1, steps=3)
    with pytest.raises(ValueError, match="y0 must be a floating-point tensor"):
        solvers.odeint(Field(), torch.ones(3, dtype=torch.int64), T01)


def test_a_state_pinned_at_the_poincare_boundary_is_named_or_warned_about():
    import geoopt

    ball = geoopt.PoincareBall()
    y0 = ball.projx(torch.full((2,), 0.3, dtype=F64))
    outward = lambda t, x: 5.0 * x  # noqa: E731  (drives every point towards the clip radius)
    with pytest.raises(solvers.BoundaryError, match=r"numerical boundary of PoincareBall.* at step \d+ \(t="):
        solvers.odeint(outward, y0, T01, method="rk4", manifold=ball, options={"step_size": 0.01})
    with pytest.warns(RuntimeWarning, match="numerical boundary"):
        ys = solvers.odeint(outward, y0, T01, method="rk4", manifold=ball,
                            options={"step_size": 0.01, "boundary": "warn"})
    assert torch.isfinite(ys).all()
    # A field that stays inside never trips it.
    solvers.odeint(lambda t, x: -x, y0, T01, method="dopri5", manifold=ball)


def test_a_manifold_that_breaks_the_solver_contract_is_refused_before_any_work():
    import geoopt

    canonical = geoopt.Stiefel()  # its proju is not idempotent: strict mode would solve another ODE
    x0 = canonical.projx(torch.randn(4, 2, dtype=F64))
    calls = []

    def field(t, x):
        calls.append(t)
        return x

    with pytest.raises(manifolds.ManifoldContractError, match="proju is not idempotent.*use manifolds.Stiefel"):
        solvers.odeint(field, x0, T01, method="rk4", manifold=canonical)
    assert not calls
    ours = manifolds.Stiefel()
    ys = solvers.odeint(field, x0, T01, method="rk4", manifold=ours, options={"steps": 4})
    assert ours.check_point_on_manifold(ys[-1], atol=1e-10)
