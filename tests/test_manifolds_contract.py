"""``check_contract`` passes on every manifold the solvers support and names what a broken one breaks.

It passes in float64 and float32 on geoopt's Euclidean, Sphere, SphereExact, EuclideanStiefel,
PoincareBall, Lorentz, SymmetricPositiveDefinite and a ProductManifold, and on ours (normalisation
spheres with eps > 0 included). It fails in
one line on geoopt's canonical ``Stiefel`` (``proju`` not idempotent), and on hand-broken
``projx``, ``proju`` and ``retr``. It leaves the global random stream alone.
"""

import warnings

import geoopt
import pytest
import torch

import manifolds
from manifolds import ManifoldContractError, check_contract

D = 6


def affine_chart() -> manifolds.AffineChart:
    gen = torch.Generator().manual_seed(1)
    weight = (torch.rand(D, generator=gen) + 0.5) * torch.tensor([1.0, -1.0] * (D // 2))
    return manifolds.AffineChart(manifolds.LayerNormSphere(), weight, torch.randn(D, generator=gen))


# name: (manifold, point shape with a batch of 8, scale of the ambient draw projected onto it)
PASSING = {
    "euclidean": (geoopt.Euclidean(ndim=1), (8, D), 1.0),
    "geoopt_sphere": (geoopt.Sphere(), (8, D), 1.0),
    "geoopt_sphere_exact": (geoopt.SphereExact(), (8, D), 1.0),
    "sphere": (manifolds.Sphere(), (8, D), 1.0),
    "sphere_exact": (manifolds.SphereExact(2.0), (8, D), 1.0),
    "rms_sphere": (manifolds.RMSSphere(), (8, 3, D), 1.0),  # a (batch, tokens, d) state
    "layernorm_sphere": (manifolds.LayerNormSphere(), (8, D), 1.0),
    "affine_chart": (affine_chart(), (8, D), 1.0),
    # eps > 0 (SVFlowLM's default 1e-5) puts projx's points eps / 2 inside the sphere, by design.
    "rms_sphere_eps": (manifolds.RMSSphere(eps=1e-5), (8, D), 1.0),
    "affine_chart_eps": (manifolds.AffineChart(manifolds.LayerNormSphere(1e-5), torch.ones(D), torch.zeros(D)), (8, D), 1.0),
    "stiefel": (manifolds.Stiefel(), (8, D, 3), 1.0),
    "special_orthogonal": (manifolds.SpecialOrthogonal(), (8, 4, 4), 1.0),
    "geoopt_euclidean_stiefel": (geoopt.EuclideanStiefel(), (8, D, 3), 1.0),
    "poincare_ball": (geoopt.PoincareBall(c=1.0), (8, D), 0.2),
    "lorentz": (geoopt.Lorentz(), (8, D), 1.0),
    "spd": (geoopt.SymmetricPositiveDefinite(), (8, 3, 3), 1.0),
    "product": (geoopt.ProductManifold((geoopt.Sphere(), 3), (geoopt.PoincareBall(), 2)), (8, 5), 0.3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", PASSING)
def test_check_contract_passes_on_supported_manifolds(name, dtype):
    manifold, shape, scale = PASSING[name]
    manifold = manifold.to(dtype)  # geoopt's curvatures are float32 parameters
    x = manifold.projx(scale * torch.randn(shape, dtype=dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_contract(manifold, x)
        check_contract(manifold, x, strict=False)
    messages = [str(w.message) for w in caught]
    if (name, dtype) == ("lorentz", torch.float64):
        # geoopt's Lorentz tangent check compares with a float32 zero and crashes in float64: it is
        # skipped, with a warning (strict mode only: relaxed mode does not check tangents).
        assert len(messages) == 1 and "check_vector_on_tangent crashed (Double did not match Float)" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_check_contract_refuses_geoopt_canonical_stiefel_in_one_line(dtype):
    stiefel = geoopt.Stiefel()  # canonical
    x = stiefel.projx(torch.randn(8, D, 3, dtype=dtype))
    with pytest.raises(ManifoldContractError) as error:
        check_contract(stiefel, x)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("Stiefel(canonical) manifold breaks the solver contract: proju is not idempotent")
    assert "use manifolds.Stiefel, whose proju is idempotent" in message
    moved = float(message.split(" by ")[1].split()[0])
    assert moved > 0.1  # by how much: a tangent vector moves by a sizeable fraction of itself
    check_contract(stiefel, x, strict=False)  # relaxed mode never calls proju on the field
    assert isinstance(error.value, ValueError)


class _Broken(manifolds.Sphere):
    """The unit sphere with one map broken."""

    def __init__(self, broken: str):
        super().__init__()
        self.broken = broken

    def projx(self, x):
        return 1.5 * super().projx(x) if self.broken == "projx" else super().projx(x)

    def proju(self, x, u):
        if self.broken == "proju_not_tangent":
            return u
        if self.broken == "proju_not_idempotent":
            return 2.0 * super().proju(x, u)
        return super().proju(x, u)

    def retr(self, x, u):
        return x + u if self.broken == "retr" else super().retr(x, u)


@pytest.mark.parametrize("broken,match", [
    ("projx", r"projx\(x \+ noise\) is off the manifold \(`norm\(x\) != 1`: .* is up to 0\.5 .*make projx return"),
    ("proju_not_tangent", r"proju\(x, u\) is not tangent at x .*make proju the projection onto the tangent space"),
    ("proju_not_idempotent", r"proju is not idempotent: .* by 1 of its size \(tolerance 1e-05\)"),
    ("retr", r"retr\(x, v\) for a tangent v of norm 0\.1 is off the manifold .*retr\(x, u\) = projx\(x \+ u\)"),
])
def test_check_contract_names_the_broken_map_and_by_how_much(broken, match):
    manifold = _Broken(broken)
    x = manifolds.Sphere().projx(torch.randn(8, D, dtype=torch.float64))
    with pytest.raises(ManifoldContractError, match=match):
        check_contract(manifold, x)
    if broken.startswith("proju"):
        check_contract(manifold, x, strict=False)


def test_check_contract_leaves_the_global_random_stream_alone():
    x = manifolds.Stiefel().projx(torch.randn(8, D, 3))
    state = torch.get_rng_state()
    check_contract(manifolds.Stiefel(), x)
    assert torch.equal(torch.get_rng_state(), state)
