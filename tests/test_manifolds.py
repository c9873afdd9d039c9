"""The manifold contract: every manifold the solvers accept behaves as geoopt's API promises.

One suite runs over our spheres, the LayerNorm sphere, the affine chart, our Stiefel manifold and
SO(n), and plain geoopt manifolds: ``projx`` lands on the manifold (and is idempotent, except the affine chart, which is
"normalise, then chart" by design), ``proju`` gives tangent vectors and is idempotent, ``retr``
lands on the manifold and agrees with ``expmap`` to first order. The normalisation spheres'
``projx`` are exactly ``F.layer_norm`` and ``F.rms_norm``. The SO(n) actions give skew generators
of the tangent vectors, orthogonal exponentials, and a ``dexpinv`` whose truncation error has the
order an RKMK method of that order needs. ``Sphere()`` is geoopt's unit sphere; ``RMSSphere()`` is
the ``sqrt(d)`` one, and the on-sphere check names the radius it checked.
"""

from dataclasses import dataclass

import geoopt
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import manifolds

F64 = torch.float64
D = 6
ATOL = 1e-10  # float64 checks of "on the manifold" / "tangent"


@dataclass
class Case:
    """A manifold and how to draw ambient points near it."""

    manifold: geoopt.Manifold
    shape: tuple = (4, D)  # a batch of 4 points
    scale: float = 1.0  # ambient draws are scale * randn (the Poincare ball needs |x| < 1)
    retraction: bool = True  # retr(x, 0) = x and retr ~ expmap to first order


def affine_chart(identity: bool = False) -> manifolds.AffineChart:
    gen = torch.Generator().manual_seed(1)
    if identity:
        return manifolds.AffineChart(manifolds.LayerNormSphere(), torch.ones(D, dtype=F64), torch.zeros(D, dtype=F64))
    # Non-zero weights of both signs, away from zero.
    weight = (torch.rand(D, generator=gen, dtype=F64) + 0.5) * torch.tensor([1.0, -1.0] * (D // 2), dtype=F64)
    bias = torch.randn(D, generator=gen, dtype=F64)
    return manifolds.AffineChart(manifolds.LayerNormSphere(), weight, bias)


CASES = {
    "sphere_default": Case(manifolds.Sphere()),
    "sphere1": Case(manifolds.Sphere(1.0)),
    "sphere3": Case(manifolds.Sphere(3.0)),
    "sphere_sqrt_d": Case(manifolds.Sphere(None)),
    "rms_sphere": Case(manifolds.RMSSphere()),
    "sphere_exact2": Case(manifolds.SphereExact(2.0)),
    "layernorm_sphere": Case(manifolds.LayerNormSphere()),
    # The Transformer's post-LN map: its "retraction" re-applies the chart, so retr(x, 0) != x.
    "affine_chart": Case(affine_chart(), retraction=False),
    "affine_chart_identity": Case(affine_chart(identity=True)),
    "euclidean": Case(geoopt.Euclidean(ndim=1)),
    "poincare_ball": Case(geoopt.PoincareBall(c=1.0), scale=0.2),
    "stiefel": Case(geoopt.EuclideanStiefel(), shape=(4, D, 3)),
    "our_stiefel": Case(manifolds.Stiefel(), shape=(4, D, 3)),
    "special_orthogonal": Case(manifolds.SpecialOrthogonal(), shape=(4, 4, 4)),
}
IDEMPOTENT = [name for name in CASES if name != "affine_chart"]
RETRACTIONS = [name for name, case in CASES.items() if case.retraction]


def point(case: Case) -> torch.Tensor:
    return case.manifold.projx(case.scale * torch.randn(case.shape, dtype=F64))


def tangent(case: Case, x: torch.Tensor) -> torch.Tensor:
    """A tangent vector at ``x`` of unit ambient norm per point."""
    u = case.manifold.proju(x, torch.randn(case.shape, dtype=F64))
    dims = tuple(range(1, u.dim()))
    return u / u.pow(2).sum(dims, keepdim=True).sqrt()


def on_manifold(case: Case, x: torch.Tensor) -> bool:
    return case.manifold.check_point_on_manifold(x, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_projx_lands_on_the_manifold(name):
    case = CASES[name]
    x = point(case)
    assert on_manifold(case, x)
    assert not on_manifold(case, x + 0.1 * torch.randn_like(x)) or name in ("euclidean", "poincare_ball")


@pytest.mark.parametrize("name", IDEMPOTENT)
def test_projx_is_idempotent(name):
    case = CASES[name]
    x = point(case)
    torch.testing.assert_close(case.manifold.projx(x), x, rtol=0, atol=ATOL)


def test_affine_chart_projx_is_layer_norm_with_its_affine_and_not_idempotent():
    chart = CASES["affine_chart"].manifold
    x = 3.0 * torch.randn(4, D, dtype=F64)
    s = chart.projx(x)
    torch.testing.assert_close(s, F.layer_norm(x, (D,), chart.weight, chart.bias, eps=0.0), rtol=0, atol=1e-12)
    assert (chart.projx(s) - s).abs().max() > 0.1  # normalise-then-chart moves image points
    # retr is that same map applied to x + u: a post-LN sublayer.
    u = chart.proju(s, torch.randn(4, D, dtype=F64))
    torch.testing.assert_close(chart.retr(s, u), chart.projx(s + u), rtol=0, atol=0)
    torch.testing.assert_close(chart.expmap(s, 0 * u), s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_proju_gives_tangent_vectors_and_is_idempotent(name):
    case = CASES[name]
    x = point(case)
    u = case.manifold.proju(x, torch.randn(case.shape, dtype=F64))
    assert case.manifold.check_vector_on_tangent(x, u, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(case.manifold.proju(x, u), u, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["sphere1", "sphere3", "sphere_sqrt_d", "rms_sphere", "sphere_exact2", "layernorm_sphere"])
def test_proju_removes_the_normal_directions_of_a_sphere(name):
    sphere = CASES[name].manifold
    x = point(CASES[name])
    torch.testing.assert_close(sphere.proju(x, 2.5 * x), torch.zeros_like(x), rtol=0, atol=1e-12)
    if name == "layernorm_sphere":  # the mean direction is normal too
        ones = torch.ones_like(x)
        torch.testing.assert_close(sphere.proju(x, ones), torch.zeros_like(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_retr_lands_on_the_manifold(name):
    case = CASES[name]
    x = point(case)
    assert on_manifold(case, case.manifold.retr(x, 0.7 * tangent(case, x)))


@pytest.mark.parametrize("name", RETRACTIONS)
def test_retr_agrees_with_expmap_to_first_order(name):
    case = CASES[name]
    x = point(case)
    u = tangent(case, x)
    torch.testing.assert_close(case.manifold.retr(x, 0 * u), x, rtol=0, atol=ATOL)
    steps = [0.2, 0.1, 0.05, 0.025]
    gaps = [(case.manifold.retr(x, s * u) - case.manifold.expmap(x, s * u)).abs().max().item() for s in steps]
    if max(gaps) < 1e-13:  # retr is expmap (SphereExact, Euclidean)
        return
    ratios = [g / s for g, s in zip(gaps, steps)]
    # |retr - expmap| = O(s^2): the ratio to s at least halves each time s halves.
    assert all(r1 <= 0.55 * r0 for r0, r1 in zip(ratios, ratios[1:])), gaps


@pytest.mark.parametrize("radius", [1.0, 3.0, None])
def test_sphere_expmap_is_the_great_circle_of_its_radius(radius):
    sphere = manifolds.Sphere(radius)
    x = sphere.projx(torch.randn(4, D, dtype=F64))
    r = D**0.5 if radius is None else radius
    torch.testing.assert_close(x.norm(dim=-1), torch.full((4,), r, dtype=F64), rtol=0, atol=1e-12)
    u = 0.8 * sphere.proju(x, torch.randn(4, D, dtype=F64))
    y = sphere.expmap(x, u)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((4,), r, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(sphere.dist(x, y), u.norm(dim=-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sphere.logmap(x, y), u, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("manifold", [manifolds.Sphere(3.0), manifolds.Sphere(None), manifolds.SphereExact(2.0)],
                         ids=["sphere3", "sphere_sqrt_d", "sphere_exact2"])
def test_sphere_expmap_of_zero_and_tiny_vectors_is_exact_and_differentiable(manifold):
    x = manifold.projx(torch.randn(4, D, dtype=F64))
    u = (1e-9 * manifold.proju(x, torch.randn(4, D, dtype=F64))).requires_grad_(True)
    torch.testing.assert_close(manifold.expmap(x, 0 * u), x, rtol=0, atol=0)
    torch.testing.assert_close(manifold.retr(x, 0 * u), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(manifold.expmap(x, u), x + u, rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(manifold.expmap(x, 0 * u).sum(), u)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_layer_norm_sphere_projx_is_layer_norm_without_affine(eps):
    x = 2.0 * torch.randn(4, D, dtype=F64) + 0.5
    got = manifolds.LayerNormSphere(eps=eps).projx(x)
    torch.testing.assert_close(got, F.layer_norm(x, (D,), eps=eps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-2])
def test_sqrt_d_sphere_projx_is_rms_norm(eps):
    x = 2.0 * torch.randn(4, D, dtype=F64)
    for sphere in (manifolds.Sphere(None, eps=eps), manifolds.RMSSphere(eps=eps)):
        torch.testing.assert_close(sphere.projx(x), F.rms_norm(x, (D,), eps=eps), rtol=0, atol=1e-12)


def test_sphere_means_what_geoopt_means_and_rms_sphere_is_the_sqrt_d_one():
    x = 3.0 * torch.randn(4, D, dtype=F64)
    assert manifolds.Sphere().radius == 1.0
    torch.testing.assert_close(manifolds.Sphere().projx(x), geoopt.Sphere().projx(x), rtol=0, atol=1e-15)
    assert manifolds.RMSSphere().radius is None and isinstance(manifolds.RMSSphere(), manifolds.Sphere)
    assert repr(manifolds.RMSSphere(eps=1e-5)) == "RMSSphere(radius=sqrt(d), eps=1e-05) manifold"


@pytest.mark.parametrize("sphere,radius", [(manifolds.Sphere(), "1"), (manifolds.Sphere(2.5), "2.5"),
                                           (manifolds.RMSSphere(), "sqrt(d) = 2.44949")], ids=["unit", "2.5", "rms"])
def test_on_sphere_check_names_the_radius_it_checked(sphere, radius):
    x = sphere.projx(torch.randn(4, D, dtype=F64))
    assert sphere.check_point_on_manifold(x)
    ok, reason = sphere.check_point_on_manifold(1.5 * x, explain=True)
    assert not ok and reason.startswith(f"`norm(x) != {radius}`: |norm(x) / r - 1| is up to 0.5 ")


def test_sphere_refuses_a_bad_radius_or_eps():
    with pytest.raises(ValueError, match="radius must be positive"):
        manifolds.Sphere(0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        manifolds.Sphere(1.0, eps=-1e-3)
    with pytest.raises(ValueError, match="weight and bias must be 1-D of equal shape"):
        manifolds.AffineChart(manifolds.LayerNormSphere(), torch.ones(D), torch.zeros(D + 1))


# --- SO(n) actions --------------------------------------------------------------------------------


def is_skew(a: torch.Tensor) -> bool:
    return torch.allclose(a, -a.transpose(-1, -2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("radius", [1.0, 2.5, None])
def test_sphere_action_generator_is_a_skew_matrix_moving_x_along_the_tangent(radius):
    sphere = manifolds.Sphere(radius)
    action = manifolds.SphereAction(sphere)
    x = sphere.projx(torch.randn(4, D, dtype=F64))
    u = torch.randn(4, D, dtype=F64)
    xi = action.generator(x, u)  # (4, D, D)
    assert xi.shape == (4, D, D) and is_skew(xi)
    torch.testing.assert_close(action.act(xi, x), sphere.proju(x, u), rtol=0, atol=1e-12)


def test_stiefel_action_generator_is_a_skew_matrix_moving_x_along_the_tangent():
    action = manifolds.StiefelAction()
    assert isinstance(action.manifold, manifolds.Stiefel)  # geoopt's canonical proju would be wrong here
    x = action.manifold.projx(torch.randn(4, D, 3, dtype=F64))
    u = torch.randn(4, D, 3, dtype=F64)
    xi = action.generator(x, u)
    assert xi.shape == (4, D, D) and is_skew(xi)
    torch.testing.assert_close(xi @ x, action.manifold.proju(x, u), rtol=0, atol=1e-12)


@pytest.mark.parametrize("action,shape", [(manifolds.SphereAction(manifolds.Sphere(2.0)), (4, D)),
                                          (manifolds.StiefelAction(), (4, D, 3)),
                                          (manifolds.StiefelAction(manifolds.SpecialOrthogonal()), (4, D, D))],
                         ids=["sphere", "stiefel", "special_orthogonal"])
def test_group_exponential_is_a_rotation_and_its_action_stays_on_the_manifold(action, shape):
    x = action.manifold.projx(torch.randn(shape, dtype=F64))
    g = action.exp(3.0 * action.generator(x, torch.randn(shape, dtype=F64)))
    torch.testing.assert_close(g.transpose(-1, -2) @ g, torch.eye(D, dtype=F64).expand(4, D, D), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.det(g), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    assert action.manifold.check_point_on_manifold(action.act(g, x), atol=ATOL, rtol=ATOL)


def skew(scale: float) -> torch.Tensor:
    a = torch.randn(D, D, dtype=F64)
    a = a - a.T
    return scale * a / a.norm()


def dexp(theta: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``dexp_theta(k)``, defined by ``d/ds exp(theta + s k)|_{s=0} = dexp_theta(k) exp(theta)``.

    The derivative is the top-right block of ``exp([[theta, k], [0, theta]])`` (exact, unlike a
    finite difference).
    """
    block = torch.zeros(2 * D, 2 * D, dtype=F64)
    block[:D, :D] = block[D:, D:] = theta
    block[:D, D:] = k
    derivative = torch.linalg.matrix_exp(block)[:D, D:]
    return derivative @ torch.linalg.matrix_exp(-theta)


def test_dexp_is_the_derivative_of_matrix_exp():
    theta, k = skew(0.7), skew(1.0)
    eps = 1e-6
    numerical = (torch.linalg.matrix_exp(theta + eps * k) - torch.linalg.matrix_exp(theta - eps * k)) / (2 * eps)
    torch.testing.assert_close(dexp(theta, k) @ torch.linalg.matrix_exp(theta), numerical, rtol=0, atol=1e-9)
    # And it is the series sum_j ad_theta^j(k) / (j + 1)!, the map dexpinv inverts.
    series, ad, factorial = torch.zeros_like(k), k, 1.0
    for j in range(25):
        factorial *= j + 1
        series = series + ad / factorial
        ad = manifolds.bracket(theta, ad)
    torch.testing.assert_close(dexp(theta, k), series, rtol=0, atol=1e-13)


def test_low_rank_sphere_action_matches_the_dense_one():
    # Every operation an RKMK step uses, on elements of well over unit size (the exponential is
    # far from its Taylor start), including sums whose columns are not blocks of the union and a
    # generator that repeats a column.
    sphere = manifolds.Sphere(2.5)
    dense, low = manifolds.SphereAction(sphere), manifolds.LowRankSphereAction(sphere)
    xs = sphere.projx(torch.randn(3, 4, D, dtype=F64))
    us = 3.0 * torch.randn(3, 4, D, dtype=F64)
    (d1, l1), (d2, l2), (d3, l3) = [(dense.generator(x, u), low.generator(x, u)) for x, u in zip(xs, us)]

    def same(lr: manifolds.LowRankSkew, matrix: torch.Tensor):
        torch.testing.assert_close(lr.dense(), matrix, rtol=0, atol=1e-12)

    same(l1, d1)
    theta_l, theta_d = (l3 + l1) + (l2 + l1) * -0.5, (d3 + d1) - 0.5 * (d2 + d1)
    same(theta_l, theta_d)
    x0 = xs[0]  # one tensor as both columns: a repeated column (u = x gives the zero element)
    same(low.generator(x0, x0) + l1, d1)
    same(low.bracket(theta_l, l2), manifolds.bracket(theta_d, d2))
    same(low.dexpinv(theta_l, l2, 4), dense.dexpinv(theta_d, d2, 4))
    moved = low.act(low.exp(theta_l), xs[0])
    torch.testing.assert_close(moved, dense.act(dense.exp(theta_d), xs[0]), rtol=0, atol=1e-12)
    assert (moved - xs[0]).norm(dim=-1).min() > 1.0  # a large rotation, not a near-identity


@pytest.mark.parametrize("order", [2, 3, 4, 5, 6])
def test_dexpinv_truncation_error_has_order_minus_one(order):
    # Keeping ad^j for j <= order - 2 leaves an error O(|theta|^(order - 1)) (or better where the
    # next Bernoulli number is 0): what RKMK of that order needs.
    action = manifolds.SphereAction()
    k = skew(1.0)
    direction = skew(1.0)
    sizes = [0.4, 0.2, 0.1, 0.05]
    errors = [(action.dexpinv(s * direction, dexp(s * direction, k), order) - k).norm().item() for s in sizes]
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert slope >= order - 1 - 0.2, errors
