"""The torus density example: its target's closed form, flow matching's geodesics on the torus, and its smoke run."""

import math

import pytest
import torch
from smoke_outputs import assert_outputs, read_csv

from experiments import torus_mixture
from solvers.flow_matching import conditional_velocity

F64 = torch.float64


@pytest.fixture(autouse=True)
def _threads():
    # The example sets torch's thread count for the whole process; later tests get theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_targets_density_is_the_closed_form_mixture_of_von_mises_products():
    a = torch.rand(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 * math.pi - math.pi
    want = 0.0
    for (m1, m2), (k1, k2), w in torus_mixture.COMPONENTS:
        # e^{k cos(a - m)} / (2 pi I_0(k)) per angle, with torch's own Bessel function.
        vm = [torch.exp(k * torch.cos(x - m)) / (2 * math.pi * torch.special.i0(torch.tensor(k, dtype=F64)))
              for x, m, k in ((a[:, 0], m1, k1), (a[:, 1], m2, k2))]
        want = want + w * vm[0] * vm[1]
    got = torus_mixture.target_distribution().log_prob(torus_mixture.to_torus(a[:, 0], a[:, 1])).exp()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_flow_matching_on_the_torus_moves_each_angle_along_the_shorter_arc_at_constant_speed():
    base = torus_mixture.uniform_torus()
    g = torch.Generator().manual_seed(1)
    x0, x1 = base.sample(32, dtype=F64, generator=g), base.sample(32, dtype=F64, generator=g)
    t = torch.rand(32, dtype=F64, generator=g)
    xt, ut = conditional_velocity(base.manifold, x0, x1, t)

    def angles(x):
        return torch.stack([torch.atan2(x[:, 1], x[:, 0]), torch.atan2(x[:, 3], x[:, 2])], -1)

    step = torch.remainder(angles(x1) - angles(x0) + math.pi, 2 * math.pi) - math.pi  # the shorter arc, in (-pi, pi]
    at = angles(x0) + t[:, None] * step  # the flat torus's geodesic: a straight line in the angles
    torch.testing.assert_close(xt, torus_mixture.to_torus(at[:, 0], at[:, 1]), rtol=0, atol=1e-12)
    # Velocity: each circle's unit tangent (-sin a, cos a) times that angle's constant rate.
    want = torch.cat([step[:, :1] * torch.stack([-at[:, 0].sin(), at[:, 0].cos()], -1),
                      step[:, 1:] * torch.stack([-at[:, 1].sin(), at[:, 1].cos()], -1)], -1)
    torch.testing.assert_close(ut, want, rtol=0, atol=1e-12)


def test_the_torus_example_smoke_run_writes_its_outputs(tmp_path):
    out = tmp_path / "torus_mixture"
    result = torus_mixture.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert [int(r["seed"]) for r in rows] == list(torus_mixture.SMOKE.seeds)
    for row, seed in zip(rows, result["seeds"]):
        assert float(row["held_out_nll"]) == pytest.approx(seed["nll"], rel=1e-5)
        assert float(row["learned_mass"]) == pytest.approx(1.0, abs=0.01)  # a CNF's density, on a coarse grid
        # Two estimates of KL(target || flow): the paired gap on the held-out points and the grid's quadrature.
        assert abs(seed["gap"] - seed["kl_quadrature"]) < 4 * seed["gap_se"]
    # The target's NLL on the held-out points estimates the exact (quadrature) entropy.
    assert result["entropy_change"] < 1e-8
    assert abs(result["target_nll"] - result["entropy"]) < 4 * result["target_nll_se"]
    assert torch.isfinite(result["seeds"][0]["learned"]).all()
