"""The support matrix, cell by cell: every method on every manifold is supported or refused.

The checks live in ``experiments/support_matrix.py`` (``python -m experiments.support_matrix``
writes the table from them); the expectations live here. A supported cell converges at its order
(or within its tolerance), stays on the manifold over a long float32 solve, and passes gradcheck
by backprop and checkpointing, with the adjoint agreeing with backprop up to the solver's error.
A refused cell is refused at set-up, before the field is called, naming the manifold, the method
and the reason; ``test_each_refusal_prevents_a_wrong_answer`` shows what the solve would give.

Gradient modes that a geoopt defect breaks are refused at set-up too (``REFUSED_GRADIENTS``).
"""

import geoopt
import pytest
import torch

import manifolds
import solvers
from experiments import support_matrix as sm

# geoopt's Lorentz tangent check compares with a float32 zero; check_contract warns and skips it.
pytestmark = pytest.mark.filterwarnings("ignore:Lorentz manifold.check_vector_on_tangent crashed")

F64 = torch.float64
RK = ("euler", "midpoint", "heun", "rk4", "bosh3", "dopri5")
FIXED_RK = ("euler", "midpoint", "heun", "rk4")
LIE = ("rkmk2", "rkmk4")
NO_ACTION = ("euclidean", "poincare", "stereographic", "lorentz", "spd", "product")

# (row, method) -> the table's short reason for the refusal.
REFUSED = {
    **{(row, m): "no SO(n) action" for row in NO_ACTION for m in LIE},
    **{("canonical_stiefel", m): "proju not a projection (contract)" for m in RK},
    **{(row, m): "SVD projx: NaN gradient" for row in ("canonical_stiefel", "geoopt_euclidean_stiefel") for m in LIE},
    **{("layernorm_sphere", m): "action leaves the mean-zero plane" for m in LIE},
    **{("sphere_exact", m): "retr caps the order at 2" for m in ("rk4", "bosh3", "dopri5")},
    **{("lorentz", m): "retr caps the order at 2" for m in ("rk4", "bosh3", "dopri5")},
    **{("geoopt_sphere_exact", m): "retr caps the order at 1" for m in RK[1:]},
    **{("spd", m): "retr caps the order at 1" for m in RK[1:]},
}
CELLS = [(row, m) for row in sm.PROBLEMS for m in sm.METHODS]
SUPPORTED = [cell for cell in CELLS if cell not in REFUSED]

# (row, method, gradient) -> what the set-up's refusal names: geoopt 0.5.1 defects, refused before any
# work (solvers.compat.check_upstream): non-reentrant checkpointing cannot recompute geoopt's TorchScript
# maps, and geoopt.EuclideanStiefel.retr fixes its QR signs in place.
REFUSED_GRADIENTS = {
    **{(row, m, "checkpoint"): "TorchScript" for row in ("poincare", "stereographic") for m in FIXED_RK},
    **{("lorentz", m, "checkpoint"): "TorchScript" for m in ("euler", "midpoint", "heun")},
    **{("geoopt_euclidean_stiefel", m, "backprop"): "in place" for m in RK},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every state here has a handful of entries: intra-op threads only contend (5x slower on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(cells) -> list[str]:
    return ["-".join(cell) for cell in cells]


def _names_manifold(message: str, manifold) -> bool:
    return type(manifold).__name__ in message or getattr(manifold, "name", "\0") in message


def test_the_matrix_covers_every_row_and_method():
    assert set(REFUSED) <= set(CELLS)
    assert {m for _, m in CELLS} == set(solvers.METHODS)
    assert {cell[0] for cell in REFUSED_GRADIENTS} <= set(sm.PROBLEMS)
    assert all(cell[:2] in SUPPORTED for cell in REFUSED_GRADIENTS)


@pytest.mark.parametrize("row, method", sorted(REFUSED), ids=_ids(sorted(REFUSED)))
def test_refused_at_set_up_naming_manifold_method_and_reason(row, method):
    message = sm.refusal(sm.PROBLEMS[row], method)  # None if the solve got as far as calling the field
    assert message is not None, "the solve was not refused before the field was called"
    assert sm.short_reason(message) == REFUSED[row, method], message
    assert _names_manifold(message, sm.PROBLEMS[row].instance().manifold), message
    if "solver contract" not in message:  # the contract refuses the manifold for every method alike
        assert f"{method} " in message, message


# Fixed-step refusals that the matrix covers for a reason other than the retraction (no action, or
# a contract that refuses every method) need no demonstration here.
_RETRACTION_CAPPED = sorted(cell for cell, reason in REFUSED.items() if reason.startswith("retr caps"))


@pytest.mark.parametrize("row, method", _RETRACTION_CAPPED, ids=_ids(_RETRACTION_CAPPED))
def test_each_refusal_prevents_a_wrong_answer(row, method):
    # The same solve through integrate, past make_solver: the order or the tolerance is not met.
    problem = sm.PROBLEMS[row]
    value, errors = sm.convergence(problem, method, unchecked=True)
    assert not sm.convergence_ok(problem, method, value, errors), (value, errors)


def test_rkmk_on_the_layernorm_sphere_would_converge_to_another_ode():
    # The refusal's reason: with a field that has a mean component, RKMK through the sphere action
    # is first order against the strict Runge-Kutta solution (which projects onto the plane).
    sphere = manifolds.LayerNormSphere()
    g = torch.Generator().manual_seed(1)
    w, c = torch.randn(5, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    field = lambda t, x: torch.tanh(x @ w.T) + c  # noqa: E731
    x0 = sphere.projx(torch.randn(2, 5, generator=g, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    exact = solvers.odeint(field, x0, t, method="dopri5", manifold=sphere, rtol=1e-12, atol=1e-12)[-1]
    rkmk = solvers.RKMK(solvers.RK4, manifolds.LowRankSphereAction(sphere))
    errors = [(solvers.integrate(field, x0, t, solver=rkmk, manifold=sphere,
                                 controller=solvers.ConstantStepSize(steps=n)).ys[-1] - exact).abs().max().item()
              for n in (16, 64)]
    assert sm.fitted_order((16, 64), errors) < 1.5, errors


@pytest.mark.parametrize("row, method", SUPPORTED, ids=_ids(SUPPORTED))
def test_converges_at_its_order(row, method):
    problem = sm.PROBLEMS[row]
    value, errors = sm.convergence(problem, method)
    assert sm.convergence_ok(problem, method, value, errors), (value, errors)


@pytest.mark.parametrize("row, method", SUPPORTED, ids=_ids(SUPPORTED))
def test_stays_on_the_manifold_over_a_long_float32_solve(row, method):
    assert sm.drift(sm.PROBLEMS[row], method) <= sm.DRIFT_TOL


GRADIENT_CELLS = [pytest.param(row, m, g, id=f"{row}-{m}-{g}") for row, m in SUPPORTED for g in sm.GRADIENTS]


@pytest.mark.parametrize("row, method, gradient", GRADIENT_CELLS)
def test_gradients(row, method, gradient):
    status, detail = sm.gradient_result(sm.PROBLEMS[row], method, gradient)
    if gradient == "adjoint" and method in LIE:  # the adjoint is for Runge-Kutta methods in strict mode
        assert status == "refused" and "RKMK" in detail and "gradient='checkpoint'" in detail, detail
    elif (row, method, gradient) in REFUSED_GRADIENTS:  # a geoopt defect, refused with its reason
        assert status == "refused" and REFUSED_GRADIENTS[row, method, gradient] in detail, detail
        assert f"gradient='{gradient}'" in detail, detail
    else:
        assert status == "ok", detail


def test_the_table_marks_each_cell_as_the_tests_expect():
    cells = {
        ("sphere", "rk4"): sm.Cell("sphere", "rk4", value=4.02, converges=True, drift=1e-7,
                                   gradients={g: ("ok", "") for g in sm.GRADIENTS}),
        ("sphere", "rkmk4"): sm.Cell("sphere", "rkmk4", value=4.1, converges=True, drift=1e-7,
                                     gradients={"backprop": ("ok", ""), "checkpoint": ("ok", ""),
                                                "adjoint": ("refused", "...")}),
        ("spd", "rk4"): sm.Cell("spd", "rk4", refused=sm.refusal(sm.PROBLEMS["spd"], "rk4")),
        ("spd", "rkmk4"): sm.Cell("spd", "rkmk4", refused=sm.refusal(sm.PROBLEMS["spd"], "rkmk4")),
        ("poincare", "rkmk4"): sm.Cell("poincare", "rkmk4", refused=sm.refusal(sm.PROBLEMS["poincare"], "rkmk4")),
        ("poincare", "rk4"): sm.Cell("poincare", "rk4", value=4.0, converges=True, drift=0.0,
                                     gradients={"backprop": ("ok", ""), "checkpoint": ("fail", "x"),
                                                "adjoint": ("ok", "")}),
    }
    assert cells["sphere", "rk4"].text() == "✓ 4.0 / b c a"
    assert cells["sphere", "rkmk4"].text() == "✓ 4.1 / b c (a refused)"
    assert cells["spd", "rk4"].text() == "refused: retr caps the order at 1"
    assert cells["poincare", "rk4"].text() == "✗ 4.0 / b a (c fails)"
    text = sm.markdown(cells, 1.0, rows=["sphere", "spd", "poincare"], methods=["rk4", "rkmk4"])
    assert "| geoopt.SymmetricPositiveDefinite |" in text and "## Defects" in text


def test_a_product_is_capped_by_its_components_retraction():
    product = geoopt.ProductManifold((geoopt.Lorentz(), 4), (geoopt.Euclidean(), 2))
    with pytest.raises(ValueError, match=r"rk4 \(order 4\) is refused on ProductManifold .*its component Lorentz"):
        solvers.make_solver("rk4", product)
    assert solvers.make_solver("heun", product).order == 2


def test_the_adjoint_refuses_relaxed_mode_at_set_up():
    inst = sm.PROBLEMS["sphere"].instance()
    theta = inst.theta.clone().requires_grad_(True)

    def sentinel(t, x):
        raise AssertionError("the field was called")

    with pytest.raises(ValueError, match="strict mode .*mode='relaxed'.*gradient='checkpoint'"):
        solvers.odeint_adjoint(sentinel, inst.y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                               manifold=inst.manifold, options={"mode": "relaxed", "steps": 2},
                               adjoint_params=(theta,))


def test_the_adjoint_refusal_names_the_solver_and_the_manifold():
    message = sm.refusal(sm.PROBLEMS["stiefel"], "rkmk2", "adjoint")
    assert "RKMK(heun" in message and "Stiefel" in message.split("got")[1], message


def test_a_float32_lorentz_with_float64_states_is_refused_with_the_fix():
    # geoopt.Lorentz() keeps its curvature in float32 and cannot check a float64 point.
    y0 = geoopt.Lorentz().to(F64).expmap0(torch.tensor([0.0, 0.3, -0.2, 0.1], dtype=F64))
    with pytest.raises(ValueError, match=r"cannot check a torch.float64 point.*manifold.to\(torch.float64\)"):
        solvers.odeint(lambda t, x: torch.zeros_like(x), y0, torch.tensor([0.0, 1.0], dtype=F64), method="euler",
                       manifold=geoopt.Lorentz(), options={"steps": 1})


def test_the_adjoint_takes_a_field_built_from_its_parameters():
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    b = torch.tanh(w)
    a = b - b.T  # built once, outside the field, by operations that save tensors for their backward
    y0 = torch.nn.functional.normalize(torch.ones(3, dtype=F64), dim=0)
    ys = solvers.odeint_adjoint(lambda t, x: x @ a.T, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                                manifold=manifolds.Sphere(), options={"steps": 4}, adjoint_params=(w,))
    ys[-1].sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().max() > 0


def test_the_script_writes_the_table(tmp_path, capsys):
    assert sm.main(["--out", str(tmp_path), "--rows", "spd", "--methods", "euler", "rk4"]) == 0
    text = (tmp_path / "support_matrix.md").read_text()
    assert "| geoopt.SymmetricPositiveDefinite | ✓ 1.0 / b c a | refused: retr caps the order at 1 |" in text
    assert "## Legend" in text
