"""``boundary_margin`` / ``at_boundary`` see the states geoopt's Poincaré ball pins at its clip radius.

States pushed outward, whether projected from far outside or carried by a solve of the radial field
``x' = x``, land on the radius ``(1 - eps) / sqrt(c)`` (eps 4e-3 in float32, 1e-5 in float64).
The predicate flags them in both dtypes and leaves interior states alone, including one just inside
the clip radius. Manifolds without a boundary give None / False.
"""

import geoopt
import pytest
import torch

import manifolds
import solvers
from manifolds import at_boundary, boundary_margin

CLIP_EPS = {torch.float32: 4e-3, torch.float64: 1e-5}  # geoopt's stereographic project


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1.0, 2.5])
def test_points_projected_from_outside_are_pinned_and_flagged(c, dtype):
    ball = geoopt.PoincareBall(c=c).to(dtype)
    pinned = ball.projx(10.0 * torch.randn(5, 4, dtype=dtype))
    clip = (1 - CLIP_EPS[dtype]) / c**0.5
    torch.testing.assert_close(pinned.norm(dim=-1), torch.full((5,), clip, dtype=dtype))
    assert abs(boundary_margin(ball, pinned)) < 1e-6 and at_boundary(ball, pinned)

    inside = ball.projx(0.1 / c**0.5 * torch.randn(5, 4, dtype=dtype))
    assert boundary_margin(ball, inside) > 0.5 and not at_boundary(ball, inside)
    # Just inside the clip radius (by 100 ulps of float32): close, but not pinned.
    near = pinned[:1] * (1 - 100 * torch.finfo(torch.float32).eps)
    assert 0 < boundary_margin(ball, near) < 1e-4 and not at_boundary(ball, near)
    # One pinned point among interior ones is enough.
    assert at_boundary(ball, torch.cat([inside, pinned[:1]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_solve_driven_outward_is_pinned_by_projx_and_flagged(dtype):
    ball = geoopt.PoincareBall(c=1.0).to(dtype)
    x0 = ball.projx(0.05 * torch.randn(3, 4, dtype=dtype))
    solve = lambda **kw: solvers.integrate(  # noqa: E731
        lambda t, x: x, x0, torch.tensor([0.0, 1.0, 10.0], dtype=dtype), solver=solvers.RungeKutta(solvers.RK4),
        manifold=ball, controller=solvers.ConstantStepSize(step_size=0.1), **kw)
    # The exact flow leaves the ball (|x| = 0.05 e^t); projx would pin the state at the clip radius.
    with pytest.raises(solvers.BoundaryError, match=r"numerical boundary of PoincareBall.* at step \d+ \(t="):
        solve()
    with pytest.warns(RuntimeWarning, match="numerical boundary"):
        sol = solve(boundary="warn")
    assert [at_boundary(ball, y) for y in sol.ys] == [False, False, True]
    assert ball.check_point_on_manifold(sol.ys[-1])


def test_product_manifold_counts_its_ball_component():
    product = geoopt.ProductManifold((geoopt.Sphere(), 3), (geoopt.PoincareBall(), 2))
    x = product.projx(torch.cat([torch.randn(4, 3), 0.1 * torch.randn(4, 2)], -1))
    assert not at_boundary(product, x) and boundary_margin(product, x) > 0.5
    x[0, 3:] = 5.0
    assert at_boundary(product, product.projx(x))


@pytest.mark.parametrize("manifold", [manifolds.Sphere(), geoopt.Euclidean(ndim=1), geoopt.SphereProjection(),
                                      geoopt.Stereographic(k=0.0), manifolds.Stiefel()],
                         ids=["sphere", "euclidean", "sphere_projection", "flat_stereographic", "stiefel"])
def test_manifolds_without_a_boundary_give_none(manifold):
    x = manifold.projx(torch.randn(4, 4, 2) if isinstance(manifold, manifolds.Stiefel) else 10.0 * torch.randn(4, 3))
    assert boundary_margin(manifold, x) is None and not at_boundary(manifold, x)
