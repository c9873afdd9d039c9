"""No silent collapse: projections of huge, tiny, zero and constant points, and bad constructor values.

A sum of squares overflows in float32 above |x| ~ 1e19 and underflows below ~1e-19: the sphere
projections rescale each point first, so such points still land on the right point of the sphere
(ordinary points keep their bits: the result is still F.rms_norm / F.layer_norm exactly). A point
with no direction (zero; constant for the LayerNorm sphere) raises ValueError with eps = 0 and maps
to 0 with eps > 0, as the normalisation layers do. NaN is passed on, not raised: the solvers' and
the training guard's non-finite checks report where it began. Constructors refuse non-finite radii
and epsilons, and affine charts that are not invertible.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import manifolds

F32, F64 = torch.float32, torch.float64
D = 6


def direction(seed: int = 0, shape=(4, D)) -> torch.Tensor:
    """Ordinary float64 points: the directions scaled to huge or tiny sizes below."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def spheres():
    """id -> (manifold, eps): every projection with its own normalisation (an AffineChart's is its base's)."""
    gen = torch.Generator().manual_seed(3)
    weight = (torch.rand(D, generator=gen, dtype=F64) + 0.5) * torch.tensor([1.0, -1.0] * (D // 2), dtype=F64)
    bias = torch.randn(D, generator=gen, dtype=F64)
    return {
        "unit": (manifolds.Sphere(), 0.0),
        "radius3": (manifolds.Sphere(3.0), 0.0),
        "radius3_eps": (manifolds.Sphere(3.0, eps=1e-5), 1e-5),
        "exact2": (manifolds.SphereExact(2.0), 0.0),
        "sqrt_d": (manifolds.Sphere(None), 0.0),
        "rms_eps": (manifolds.RMSSphere(eps=1e-5), 1e-5),
        "layernorm": (manifolds.LayerNormSphere(), 0.0),
        "layernorm_eps": (manifolds.LayerNormSphere(eps=1e-5), 1e-5),
        "chart_ln": (manifolds.AffineChart(manifolds.LayerNormSphere(), weight, bias), 0.0),
        "chart_ln_eps": (manifolds.AffineChart(manifolds.LayerNormSphere(1e-5), weight, bias), 1e-5),
        "chart_rms_eps": (manifolds.AffineChart(manifolds.Sphere(None, 1e-5), weight, 0 * bias), 1e-5),
    }


SPHERES = spheres()
EXACT = [name for name, (_, eps) in SPHERES.items() if eps == 0]


def cast(manifold, dtype):
    """A copy of the manifold with its chart's tensors in ``dtype`` (the spheres hold none)."""
    return copy.deepcopy(manifold).to(dtype)


def unit_projection(manifold, x: torch.Tensor) -> torch.Tensor:
    """The exact projection (eps = 0) of float64 points, written out: the reference."""
    base = manifold.base if isinstance(manifold, manifolds.AffineChart) else manifold
    x = x / x.abs().amax(-1, keepdim=True)  # float64 squares of 1e300 overflow too, means of 1e-320 round
    if isinstance(base, manifolds.LayerNormSphere):
        x = x - x.mean(-1, keepdim=True)
    y = x / x.norm(dim=-1, keepdim=True) * base.r(x)
    return manifold.from_base(y.to(manifold.weight)) if isinstance(manifold, manifolds.AffineChart) else y


# --- huge and tiny points ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,scales", [(F32, [1e30, 3e37, 1e-30, 1e-42]), (F64, [1e300, 1e-300, 1e-320])],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("name", EXACT)
def test_huge_and_tiny_points_project_to_the_point_of_their_direction(name, dtype, scales):
    manifold = cast(SPHERES[name][0], dtype)
    v = direction()
    tol = 1e-5 if dtype == F32 else 1e-12
    for scale in scales:
        x = (scale * v).to(dtype)
        got = manifold.projx(x)  # float32 squares overflow above ~1e19 and underflow below ~1e-19
        assert torch.isfinite(got).all(), (scale, got)
        torch.testing.assert_close(got, unit_projection(manifold, x.to(F64)).to(dtype), rtol=tol, atol=tol,
                                   msg=f"scale {scale:g}")
        if scale * v.abs().min() > torch.finfo(dtype).tiny:  # not subnormal: v's direction itself survives
            torch.testing.assert_close(got, unit_projection(manifold, v).to(dtype), rtol=tol, atol=tol,
                                       msg=f"scale {scale:g}")


def test_the_issue_examples():
    sphere = manifolds.Sphere(1.0)
    third = torch.full((3,), 3**-0.5)
    torch.testing.assert_close(sphere.projx(torch.full((3,), 1e30)), third)  # was 0
    torch.testing.assert_close(sphere.projx(torch.full((3,), 1e-30)), third)  # was inf


@pytest.mark.parametrize("name", [n for n in SPHERES if SPHERES[n][1] > 0])
def test_with_eps_huge_points_land_on_the_sphere_and_tiny_ones_are_divided_by_sqrt_eps(name):
    manifold, eps = SPHERES[name]
    manifold = cast(manifold, F32)
    v = direction(1)
    for scale in (1e25, 1e36):  # squares overflow float32: the old projx returned 0 (the bias)
        torch.testing.assert_close(manifold.projx((scale * v).float()), unit_projection(manifold, v).float(),
                                   rtol=1e-5, atol=1e-5)
    # Tiny points: eps dominates, and the layer's answer is x / sqrt(eps) (then the chart).
    x = (1e-25 * v).float()
    if isinstance(manifold, manifolds.AffineChart):
        got = manifold.to_base(manifold.projx(x))  # the chart adds the bias: 1e-22 is below its ulp
        torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-6)
    else:
        centred = x - x.mean(-1, keepdim=True) if isinstance(manifold, manifolds.LayerNormSphere) else x
        torch.testing.assert_close(manifold.projx(x).double(), centred.double() / math.sqrt(eps), rtol=1e-5, atol=0)


@pytest.mark.parametrize("manifold", [manifolds.Sphere(None), manifolds.Sphere(2.0), manifolds.LayerNormSphere()],
                         ids=["sqrt_d", "radius2", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_huge_and_tiny_points_normalise_in_float32(manifold, dtype):
    v = direction(2)
    scales = [1e30, 1e-30] if dtype == torch.bfloat16 else [1e4, 1e-7]  # what each format can hold
    for scale in scales:
        x = (scale * v).to(dtype)
        y = manifold.projx(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, manifold.projx(x.float()).to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(y.float(), unit_projection(manifold, x.double()).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["unit", "radius3", "sqrt_d", "layernorm", "chart_ln", "chart_ln_eps", "rms_eps"])
def test_gradients_of_huge_and_tiny_points_are_the_scaled_gradients(name):
    # projx is scale-invariant: its derivative at c v is that at v over c. With eps > 0 it is that of
    # the exact projection (eps = 0) at v: against a huge point's mean square eps is nothing.
    manifold, eps = SPHERES[name]
    exact = copy.deepcopy(manifold)
    (exact.base if isinstance(exact, manifolds.AffineChart) else exact).eps = 0.0
    v, w = direction(4), direction(5)

    def grad(manifold, x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((manifold.projx(x) * w).sum(), x)
        return g

    torch.testing.assert_close(grad(manifold, 1e250 * v) * 1e250, grad(exact, v), rtol=1e-9, atol=1e-12)
    if eps == 0:
        torch.testing.assert_close(grad(manifold, 1e-250 * v) * 1e-250, grad(exact, v), rtol=1e-9, atol=1e-12)
    # float32: squares overflow above ~1e19, and the backward's |x|^-3 below ~1e-13.
    v32, w32 = v.float(), w.float()
    x = (1e30 * v32).requires_grad_(True)
    (g,) = torch.autograd.grad((cast(manifold, F32).projx(x) * w32).sum(), x)
    torch.testing.assert_close(g.double() * 1e30, grad(exact, v32.double()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-2])
def test_ordinary_points_keep_their_bits(eps):
    # The rescale leaves ordinary points alone (s = 1 exactly): still RMSNorm and LayerNorm to the bit.
    for dtype in (F32, F64):
        x = (5.0 * direction(6, (3, 7, 16))).to(dtype)
        weight, bias = direction(7, (16,)).to(dtype) + 2.0, direction(8, (16,)).to(dtype)
        assert torch.equal(manifolds.Sphere(None, eps).projx(x), F.rms_norm(x, (16,), eps=eps))
        assert torch.equal(manifolds.LayerNormSphere(eps).projx(x), F.layer_norm(x, (16,), eps=eps))
        chart = manifolds.AffineChart(manifolds.LayerNormSphere(eps), weight, bias)
        assert torch.equal(chart.projx(x), F.layer_norm(x, (16,), weight, bias, eps=eps))


# --- points with no direction ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unit", "radius3", "exact2", "sqrt_d"])
def test_a_zero_vector_raises_with_eps_zero(name):
    manifold = SPHERES[name][0]
    x = direction(9)
    x[2] = 0.0
    with pytest.raises(ValueError, match=r"got 1 zero vector\(s\) among 4 points: a zero vector has no direction"):
        manifold.projx(x)
    with pytest.raises(ValueError, match="zero vector"):
        manifold.projx(torch.zeros(3))  # the issue's example: was NaN


@pytest.mark.parametrize("name", ["layernorm", "chart_ln"])
def test_a_constant_point_raises_on_the_layer_norm_sphere_with_eps_zero(name):
    manifold = SPHERES[name][0]
    x = direction(10)
    x[1], x[3] = 0.0, 2.5  # zero and constant: both have mean-zero part 0
    with pytest.raises(ValueError, match=r"got 2 constant point\(s\) among 4: their mean-zero part is 0"):
        manifold.projx(x)


@pytest.mark.parametrize("name", [n for n in SPHERES if SPHERES[n][1] > 0])
def test_with_eps_a_zero_or_constant_point_maps_to_zero_as_the_layer_does(name):
    manifold, eps = SPHERES[name]
    x = direction(11)
    x[0] = 0.0
    x[1] = 1.5
    got = manifold.projx(x)
    assert torch.isfinite(got).all()
    base = manifold.base if isinstance(manifold, manifolds.AffineChart) else manifold
    s = manifold.to_base(got) if isinstance(manifold, manifolds.AffineChart) else got
    torch.testing.assert_close(s[0], torch.zeros(D, dtype=F64), rtol=0, atol=1e-12)
    if isinstance(base, manifolds.LayerNormSphere):
        torch.testing.assert_close(s[1], torch.zeros(D, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(got, F.layer_norm(x, (D,), getattr(manifold, "weight", None),
                                                     getattr(manifold, "bias", None), eps=eps), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SPHERES))
def test_nan_is_passed_on_not_raised(name):
    # The solvers' check_finite and the training FiniteGuard report where a NaN began: projx must
    # neither raise on it nor hide it.
    manifold = SPHERES[name][0]
    x = direction(12)
    x[1, 2] = math.nan
    x[3] = math.inf
    got = manifold.projx(x)
    assert got[1].isnan().any() and got[3].isnan().any()
    assert torch.isfinite(got[[0, 2]]).all()


def test_a_one_dimensional_layer_norm_sphere_is_refused():
    message = ("LayerNormSphere needs at least 2 coordinates, got d = 1: "
               "the mean-zero sphere in 1 dimension has no points")
    for eps in (0.0, 1e-5):
        sphere = manifolds.LayerNormSphere(eps)
        with pytest.raises(ValueError, match=message):
            sphere.projx(torch.randn(4, 1))
        with pytest.raises(ValueError, match=message):
            sphere.projx_affine(torch.randn(4, 1), torch.ones(1), torch.zeros(1))
        with pytest.raises(ValueError, match=message):
            manifolds.AffineChart(sphere, torch.ones(1), torch.zeros(1))
    assert manifolds.LayerNormSphere().projx(torch.tensor([[3.0, 1.0]])).tolist() == [[1.0, -1.0]]  # d = 2 works


# --- under torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["radius3", "sqrt_d", "layernorm", "chart_ln", "chart_ln_eps", "rms_eps"])
def test_compiled_projx_has_no_graph_break_and_rescales(name):
    manifold, eps = SPHERES[name]
    manifold = cast(manifold, F32)
    torch._dynamo.reset()
    v = direction(13).float()
    tiny = 1e-30 if eps == 0 else 1e20  # with eps > 0 a tiny point is x / sqrt(eps), not on the sphere
    x = torch.stack([1e30 * v[0], tiny * v[1], 1e3 * v[2], 1e8 * v[3]])
    explained = torch._dynamo.explain(manifold.projx)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(manifold.projx, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), manifold.projx(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(x), unit_projection(manifold, x.double()).float(), rtol=1e-5, atol=1e-5)


def test_compiled_projx_skips_the_zero_check_and_gives_nan():
    # The documented limit: a data-dependent check cannot run inside a graph.
    torch._dynamo.reset()
    compiled = torch.compile(manifolds.Sphere(2.0).projx, backend="aot_eager", fullgraph=True)
    assert compiled(torch.zeros(2, 3)).isnan().all()


# --- constructors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [math.inf, -math.inf, math.nan, 0.0, -1.0])
def test_sphere_refuses_a_radius_that_is_not_positive_and_finite(radius):
    message = r"Sphere radius must be positive and finite, got .*: pass the radius, or None"
    with pytest.raises(ValueError, match=message):
        manifolds.Sphere(radius)
    with pytest.raises(ValueError, match="radius must be positive and finite"):
        manifolds.SphereExact(radius)


@pytest.mark.parametrize("eps", [math.nan, math.inf, -1e-3])
@pytest.mark.parametrize("make", [lambda eps: manifolds.Sphere(1.0, eps=eps), lambda eps: manifolds.Sphere(None, eps),
                                  manifolds.RMSSphere, manifolds.LayerNormSphere],
                         ids=["sphere", "sqrt_d", "rms", "layernorm"])
def test_spheres_refuse_an_eps_that_is_not_non_negative_and_finite(make, eps):
    with pytest.raises(ValueError, match=r"eps must be non-negative and finite, got .*: 0 for the exact projection"):
        make(eps)


@pytest.mark.parametrize("weight,bias,message", [
    ([1.0, 0.0, -2.0, 0.0], [0.0] * 4,
     (r"AffineChart weight has 2 zero entries \(first at index 1\): "
      r"the chart x = weight \* s \+ bias is then not invertible")),
    ([1.0, -0.0, 2.0, 3.0], [0.0] * 4, r"weight has 1 zero entry \(first at index 1\)"),
    ([1.0, math.nan, 2.0, 3.0], [0.0] * 4, r"AffineChart weight has 1 non-finite entry \(first at index 1: nan\)"),
    ([1.0, 2.0, math.inf, 3.0], [0.0] * 4, r"AffineChart weight has 1 non-finite entry \(first at index 2: inf\)"),
    ([1.0, 2.0, 2.0, 3.0], [0.0, 0.0, 0.0, -math.inf],
     r"AffineChart bias has 1 non-finite entry \(first at index 3: -inf\)"),
], ids=["zeros", "negative_zero", "nan_weight", "inf_weight", "inf_bias"])
def test_affine_chart_refuses_a_weight_that_is_not_invertible_or_values_that_are_not_finite(weight, bias, message):
    for make in (torch.tensor, lambda v: torch.nn.Parameter(torch.tensor(v))):
        with pytest.raises(ValueError, match=message):
            manifolds.AffineChart(manifolds.LayerNormSphere(), make(weight), make(bias))


def test_affine_chart_check_false_skips_the_value_check_for_derived_charts():
    # For charts built inside a forward pass from checked ones (svflow_ode.model.chart_at): no host sync.
    chart = manifolds.AffineChart(manifolds.LayerNormSphere(1e-5), torch.zeros(4), torch.zeros(4), check=False)
    torch.testing.assert_close(chart.projx(torch.randn(2, 4)), torch.zeros(2, 4))
