"""Riemannian flow matching: geodesic paths, their velocity against finite differences, the loss, training."""

import math

import geoopt
import pytest
import torch

import manifolds
from manifolds.distributions import HaarSO3, UniformSphere, VonMisesFisher, WrappedNormal
from solvers.flow_matching import (
    FlowMatching, conditional_velocity, flow_matching_loss, geodesic, geodesic_maps, squared_norm,
)

F64 = torch.float64
BALL = geoopt.PoincareBall(c=torch.tensor(1.5, dtype=F64))


def _pairs(name, n, seed):
    g = torch.Generator().manual_seed(seed)
    if name == "sphere":
        draw = lambda: UniformSphere(3).sample(n, dtype=F64, generator=g)  # noqa: E731
        return manifolds.Sphere(1.0), draw(), draw()
    if name == "so3":
        return manifolds.SpecialOrthogonal(), HaarSO3().sample(n, dtype=F64, generator=g), HaarSO3().sample(n, dtype=F64, generator=g)
    x0 = WrappedNormal(torch.tensor([0.1, -0.2], dtype=F64), 0.8, c=1.5).sample(n, generator=g)
    x1 = WrappedNormal(torch.tensor([-0.4, 0.3], dtype=F64), 0.8, c=1.5).sample(n, generator=g)
    return BALL, x0, x1


@pytest.mark.parametrize("name", ["sphere", "so3", "ball"])
def test_the_target_velocity_is_the_paths_derivative(name):
    manifold, x0, x1 = _pairs(name, 16, 0)
    t = torch.rand(16, dtype=F64, generator=torch.Generator().manual_seed(1))
    xt, ut = conditional_velocity(manifold, x0, x1, t)
    h = 1e-5
    difference = (geodesic(manifold, x0, x1, t + h) - geodesic(manifold, x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(ut, difference, rtol=0, atol=1e-8)  # measured: 3e-10 (the difference's error)
    assert ut.abs().max() > 0.5
    torch.testing.assert_close(xt, geodesic(manifold, x0, x1, t), rtol=0, atol=1e-14)
    torch.testing.assert_close(manifold.proju(xt, ut), ut, rtol=0, atol=1e-12)  # tangent at x_t
    # The ends, and a geodesic's constant speed: |u_t| = |log_{x0}(x1)| = the distance, at every t.
    torch.testing.assert_close(geodesic(manifold, x0, x1, torch.zeros(16, dtype=F64)), x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(geodesic(manifold, x0, x1, torch.ones(16, dtype=F64)), x1, rtol=0, atol=1e-12)
    _, log = geodesic_maps(manifold)
    torch.testing.assert_close(squared_norm(manifold, xt, ut), squared_norm(manifold, x0, log(x0, x1)), rtol=1e-10, atol=0)
    if name != "so3":
        torch.testing.assert_close(squared_norm(manifold, xt, ut).sqrt(), manifold.dist(x0, x1), rtol=1e-10, atol=0)


def test_the_rotation_logarithm_inverts_the_exponential_at_every_angle():
    so3 = manifolds.SpecialOrthogonal()
    x = HaarSO3().sample(64, dtype=F64, generator=torch.Generator().manual_seed(2))
    exp, log = geodesic_maps(so3)
    axis = torch.nn.functional.normalize(torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(3)), dim=-1)
    angle = torch.cat([torch.logspace(-9, -1, 16, dtype=F64), torch.linspace(0.2, math.pi - 1e-3, 48, dtype=F64)])
    w = angle[:, None] * axis
    hat = torch.zeros(64, 3, 3, dtype=F64)
    hat[:, 0, 1], hat[:, 0, 2], hat[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    hat = hat - hat.transpose(-1, -2)
    u = x @ hat  # tangent at x, rotation angle `angle`
    torch.testing.assert_close(log(x, exp(x, u)), u, rtol=0, atol=1e-9)
    # Its length in the Frobenius metric is sqrt(2) times the angle.
    torch.testing.assert_close(squared_norm(so3, x, log(x, exp(x, u))), 2 * angle.pow(2), rtol=1e-9, atol=1e-24)


@pytest.mark.parametrize("name", ["sphere", "so3", "ball"])
def test_the_loss_is_zero_for_the_exact_conditional_field(name):
    # Given x1, the geodesic path's conditional field is u_t(x | x1) = log_x(x1) / (1 - t) (Chen & Lipman
    # 2023, eq. 14 with the geodesic distance): a closed form independent of the autograd velocity.
    manifold, x0, x1 = _pairs(name, 32, 4)
    _, log = geodesic_maps(manifold)
    t = 0.9 * torch.rand(32, dtype=F64, generator=torch.Generator().manual_seed(5))
    nd = 2 if name == "so3" else 1
    exact = lambda t, x: log(x, x1) / (1 - t).reshape(-1, *[1] * nd)  # noqa: E731
    assert flow_matching_loss(exact, manifold, x0, x1, t).item() < 1e-18
    assert flow_matching_loss(lambda t, x: torch.zeros_like(x), manifold, x0, x1, t).item() > 0.5


class TangentField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.SiLU(), torch.nn.Linear(64, 3)).double()

    def forward(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[:-1])
        return self.net(torch.cat([x, t[..., None]], -1))


def test_a_short_training_run_lowers_the_loss_and_gives_a_cnf():
    target = VonMisesFisher(torch.tensor([0.0, 0.6, 0.8], dtype=F64), 8.0)
    fm = FlowMatching(TangentField(), manifolds.Sphere(1.0), UniformSphere(3))
    g = torch.Generator().manual_seed(6)
    held_out = (UniformSphere(3).sample(512, dtype=F64, generator=g), target.sample(512, generator=g),
                torch.rand(512, dtype=F64, generator=g))

    def held_out_loss():
        with torch.no_grad():
            return flow_matching_loss(fm.field, fm.manifold, *held_out).item()

    before = held_out_loss()
    optimizer = torch.optim.Adam(fm.parameters(), lr=3e-3)
    for _ in range(150):
        loss = fm.loss(target.sample(128, generator=g), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)
    # The trained flow, as a CNF: more likely on the target's samples than the uniform base is.
    cnf = fm.cnf(options={"steps": 8})
    with torch.no_grad():
        nll = -cnf.log_prob(target.sample(256, generator=g)).mean().item()
    assert nll < math.log(4 * math.pi) - 0.5, nll


def test_bad_input_is_refused_in_one_line():
    sphere = manifolds.Sphere(1.0)
    with pytest.raises(ValueError, match="flow matching needs the exp and log maps of Stiefel"):
        FlowMatching(TangentField(), geoopt.Stiefel(), UniformSphere(3))
    with pytest.raises(ValueError, match=r"lives on PoincareBall manifold \(curvature -1.0\), not on the flow's Sphere"):
        FlowMatching(TangentField(), sphere, WrappedNormal(torch.zeros(3, dtype=F64), 1.0))
    x = sphere.projx(torch.randn(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"need one time per point: t has shape \(3,\), points \(4, 3\)"):
        geodesic(sphere, x, x, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="the rotation logarithm here is SO\\(3\\)'s"):
        geodesic(manifolds.SpecialOrthogonal(), torch.eye(4, dtype=F64)[None], torch.eye(4, dtype=F64)[None],
                 torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError, match="the flow-matching loss is nan"):
        flow_matching_loss(lambda t, x: x * float("nan"), sphere, x, -x.flip(0), torch.full((4,), 0.5, dtype=F64))
