"""``manifolds.Stiefel`` and ``SpecialOrthogonal``: the maps solvers call, their derivatives, and solves.

Each of geoopt 0.5.1's failures has a test here that would catch it. The canonical Stiefel's
``proju`` is not idempotent. ``projx`` by SVD has a NaN backward at orthonormal matrices. The
in-place QR sign fix breaks backprop. Here, in float64: ``proju`` is the idempotent orthogonal
projection; ``projx`` is the polar factor, with a backward equal to the tangent projection on the
manifold (gradcheck and gradgradcheck on, near and far from it); ``retr`` and ``expmap`` pass
gradcheck. rk4 and rkmk4 on ``X' = Omega X`` converge at order 4 against ``matrix_exp``; parameter
gradients through RKMK on SO(n) are finite and equal finite differences.
"""

import geoopt
import numpy as np
import pytest
import torch

import manifolds
import solvers

F64 = torch.float64
STIEFEL, SO = manifolds.Stiefel(), manifolds.SpecialOrthogonal()
CASES = {"stiefel": (STIEFEL, (3, 6, 3)), "so": (SO, (3, 4, 4))}


def skew(n: int, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(n, n, dtype=F64)
    return scale * (a - a.T) / 2


def point_and_tangent(name: str):
    manifold, shape = CASES[name]
    x = manifold.random(*shape, dtype=F64)
    return manifold, x, manifold.proju(x, torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("name", CASES)
def test_proju_is_the_idempotent_orthogonal_projection_onto_the_tangent_space(name):
    manifold, x, u = point_and_tangent(name)
    xtu = x.transpose(-1, -2) @ u
    torch.testing.assert_close(xtu, -xtu.transpose(-1, -2), rtol=0, atol=1e-14)  # tangent
    torch.testing.assert_close(manifold.proju(x, u), u, rtol=0, atol=1e-14)  # idempotent
    # Orthogonal: what it removes from an ambient w is orthogonal to every tangent vector.
    w = torch.randn_like(x)
    assert manifold.inner(x, w - manifold.proju(x, w), u).abs().max() < 1e-13
    if name == "so":  # the SO(n) formula X skew(X^T U) is the Stiefel one on a square X
        torch.testing.assert_close(manifold.proju(x, w), STIEFEL.proju(x, w), rtol=0, atol=1e-14)


def test_geoopt_canonical_proju_moves_tangent_vectors_and_ours_does_not():
    x = STIEFEL.random(6, 3, dtype=F64)
    u = skew(6) @ x  # tangent
    assert (geoopt.Stiefel().proju(x, u) - u).abs().max() > 0.1
    torch.testing.assert_close(STIEFEL.proju(x, u), u, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(3, 6, 3), (3, 4, 4)], ids=["tall", "square"])
def test_projx_is_the_polar_factor_and_idempotent(shape):
    a = torch.randn(shape, dtype=F64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    q = STIEFEL.projx(a)
    torch.testing.assert_close(q, u @ vh, rtol=0, atol=1e-13)
    torch.testing.assert_close(STIEFEL.projx(q), q, rtol=0, atol=1e-15)
    # From a float32 point off the manifold, too.
    q32 = STIEFEL.projx(a.float())
    assert STIEFEL.check_point_on_manifold(q32, atol=1e-6)


def test_projx_backward_at_an_orthonormal_matrix_is_the_tangent_projection_not_nan():
    q = SO.random(4, 4, dtype=F64)
    e = torch.randn(4, 4, dtype=F64)
    svd_grad = torch.autograd.grad((geoopt.EuclideanStiefel().projx(q.requires_grad_()) * e).sum(), q)[0]
    assert torch.isnan(svd_grad).any()  # geoopt's SVD: degenerate singular values
    for manifold in (STIEFEL, SO):
        (grad,) = torch.autograd.grad((manifold.projx(q) * e).sum(), q)
        torch.testing.assert_close(grad, STIEFEL.proju(q.detach(), e), rtol=0, atol=1e-14)


@pytest.mark.parametrize("where", ["on", "near", "far"])
@pytest.mark.parametrize("name", CASES)
def test_projx_passes_gradcheck_and_gradgradcheck(name, where):
    manifold, shape = CASES[name]
    a = {
        "on": manifold.random(*shape, dtype=F64),
        "near": manifold.random(*shape, dtype=F64) + 1e-3 * torch.randn(shape, dtype=F64),
        "far": torch.randn(shape, dtype=F64) + 2.0 * torch.eye(*shape[-2:], dtype=F64),  # keeps det > 0
    }[where][0].requires_grad_(True)
    assert torch.autograd.gradcheck(manifold.projx, (a,))
    assert torch.autograd.gradgradcheck(manifold.projx, (a,))


@pytest.mark.parametrize("name", CASES)
def test_retr_and_expmap_pass_gradcheck_with_no_in_place_error(name):
    manifold, x, u = point_and_tangent(name)
    args = (x[0].requires_grad_(True), (0.3 * u[0]).requires_grad_(True))  # one point: gradgradcheck is O(size^2)
    assert torch.autograd.gradcheck(manifold.retr, args)
    assert torch.autograd.gradgradcheck(manifold.retr, args)
    assert torch.autograd.gradcheck(manifold.expmap, args)


@pytest.mark.parametrize("name", CASES)
def test_retr_fixes_the_manifold_and_lands_on_it(name):
    manifold, x, u = point_and_tangent(name)
    torch.testing.assert_close(manifold.retr(x, 0 * u), x, rtol=0, atol=1e-14)  # qf(X) = X
    y = manifold.retr(x, 2.0 * u)
    assert manifold.check_point_on_manifold(y, atol=1e-13, rtol=0)


def test_so_n_expmap_is_the_group_exponential_and_points_are_rotations():
    x = SO.random(3, 4, 4, dtype=F64)
    omega = skew(4)
    torch.testing.assert_close(SO.expmap(x, x @ omega), x @ torch.linalg.matrix_exp(omega), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.linalg.det(x), torch.ones(3, dtype=F64), rtol=0, atol=1e-13)
    reflection = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64))
    assert SO.check_point_on_manifold(SO.projx(x @ reflection), atol=1e-13, rtol=0)  # det fixed to +1
    assert SO.check_point_on_manifold(SO.retr(x, -2.0 * x), atol=1e-13, rtol=0)  # retr through det < 0


def test_on_manifold_checks_say_what_is_wrong_and_by_how_much():
    x = SO.random(4, 4, dtype=F64)
    ok, reason = SO.check_point_on_manifold(x @ torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64)), explain=True)
    assert not ok and "det(X) = -1" in reason
    ok, reason = STIEFEL.check_point_on_manifold(1.01 * x, explain=True)
    assert not ok and "max |X^T X - I| = 0.0201" in reason
    ok, reason = STIEFEL.check_vector_on_tangent(x, x, explain=True)
    assert not ok and "is 2 >" in reason
    ok, reason = SO.check_point_on_manifold(STIEFEL.random(5, 3), explain=True)
    assert not ok and "must be square" in reason


def test_polar_refuses_a_rank_deficient_matrix():
    a = torch.randn(6, 3, dtype=F64)
    a[:, 2] = a[:, 1]
    with pytest.raises(ValueError, match="rank-deficient"):
        manifolds.polar(a)


@pytest.mark.parametrize("name", CASES)
def test_stiefel_action_generator_moves_x_by_a_tangent_vector(name):
    manifold, x, u = point_and_tangent(name)
    xi = manifolds.StiefelAction(manifold).generator(x, u)
    torch.testing.assert_close(xi, -xi.transpose(-1, -2), rtol=0, atol=1e-14)
    torch.testing.assert_close(xi @ x, u, rtol=0, atol=1e-14)
    if name == "so":
        torch.testing.assert_close(xi, u @ x.transpose(-1, -2), rtol=0, atol=1e-14)


# --- solves ---------------------------------------------------------------------------------------


def solver_for(method: str, manifold):
    if method == "rk4":
        return solvers.RungeKutta(solvers.RK4)
    return solvers.RKMK(solvers.RK4, manifolds.StiefelAction(manifold))


def end_state(field, x0, method, manifold, steps, t1=1.0):
    sol = solvers.integrate(field, x0, torch.tensor([0.0, t1], dtype=F64), solver=solver_for(method, manifold),
                            manifold=manifold, controller=solvers.ConstantStepSize(steps=steps))
    return sol.ys[-1]


@pytest.mark.parametrize("name,method", [("stiefel", "rk4"), ("stiefel", "rkmk4"), ("so", "rk4")])
def test_rk4_and_rkmk4_converge_at_order_4_against_matrix_exp(name, method):
    manifold, shape = CASES[name]
    omega = skew(shape[-2], scale=1.5)
    x0 = manifold.random(*shape[1:], dtype=F64)
    exact = torch.linalg.matrix_exp(omega) @ x0
    steps = [4, 8, 16, 32]
    errors = [(end_state(lambda t, x: omega @ x, x0, method, manifold, n) - exact).abs().max().item() for n in steps]
    order = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    assert 3.7 <= order <= 4.5, errors


def test_rkmk4_on_so_n_is_exact_for_a_constant_generator():
    # On SO(n) the generator of Omega X is Omega itself: the RKMK step is matrix_exp(h Omega).
    omega = skew(4, scale=1.5)
    x0 = SO.random(4, 4, dtype=F64)
    got = end_state(lambda t, x: omega @ x, x0, "rkmk4", SO, steps=3)
    torch.testing.assert_close(got, torch.linalg.matrix_exp(omega) @ x0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("manifold,shape,method", [(SO, (3, 3), "rkmk4"), (SO, (3, 3), "rk4"), (STIEFEL, (4, 2), "rkmk4")],
                         ids=["so-rkmk4", "so-rk4", "stiefel-rkmk4"])
def test_parameter_gradients_through_a_solve_are_finite_and_equal_finite_differences(manifold, shape, method):
    # X' = A(theta, t) X with A = skew(theta_0 + t theta_1): a time-dependent generator, so RKMK's
    # dexpinv terms and the final projx are all on the gradient's path.
    n = shape[0]
    x0 = manifold.random(*shape, dtype=F64)
    w = torch.randn(shape, dtype=F64)

    def loss(theta):
        def field(t, x):
            a = theta[0] + t * theta[1]
            return (a - a.T) @ x

        return (w * end_state(field, x0, method, manifold, steps=3)).sum()

    theta = (0.5 * torch.randn(2, n, n, dtype=F64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(theta), theta)
    assert torch.isfinite(grad).all()
    assert torch.autograd.gradcheck(loss, (theta,))


def test_odeint_picks_the_stiefel_action_for_so_n():
    omega = skew(4)
    x0 = SO.random(4, 4, dtype=F64)
    ys = solvers.odeint(lambda t, x: omega @ x + 0.1 * torch.sin(x), x0, torch.linspace(0, 1, 3, dtype=F64),
                        method="rkmk4", manifold=SO, options={"step_size": 0.1})
    assert SO.check_point_on_manifold(ys, atol=1e-13, rtol=0)
