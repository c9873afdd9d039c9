"""The SO(3) attitude and Poincaré-disk worked examples run end to end in smoke mode, write their
md/csv/png, and show what must hold even untrained: the manifold solve stays on the manifold (to
float precision on SO(3), inside the clip radius on the ball), the Euclidean solve does not."""

import math

import pytest
import torch
from smoke_outputs import read_csv

from experiments import poincare_flow, so3_attitude


@pytest.fixture(autouse=True)
def _threads():
    # The examples set torch's thread count for the whole process; later tests get theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _outputs(out, name):
    for suffix in (".md", ".csv", ".png"):
        assert (out / f"{name}{suffix}").stat().st_size > 0, suffix
    md = (out / f"{name}.md").read_text()
    assert "SMOKE RUN" in md and "torch" in md and "runtime" in md and "seeds" in md
    return md, read_csv(out / f"{name}.csv")


def _finite(*values):
    return all(math.isfinite(v) for v in values)


def test_so3_attitude_smoke(tmp_path):
    result = so3_attitude.main(["--smoke", "--out", str(tmp_path)])
    md, rows = _outputs(tmp_path, "so3_attitude")
    assert "drift" in md and "held-out" in md
    assert len(rows) == 2 * len(result["long_times"])
    # The reference is accurate: an independent fine solve agrees, and the energy is conserved.
    assert result["reference"]["ref_vs_fine_rk4_deg"] < 1e-5
    assert result["reference"]["ref_energy_rel_drift"] < 1e-10
    manifold, euclidean = result["metrics"]["manifold", "test"], result["metrics"]["euclidean", "test"]
    # On SO(3) the states are rotations to float32 rounding over the whole extrapolated horizon ...
    assert manifold["drift_max"] < 1e-5
    assert manifold["det_final_min"] == pytest.approx(1.0, abs=1e-5)
    # ... in R^{3x3} the same model's states are not.
    assert euclidean["drift_max"] > 1e-3
    for m in (manifold, euclidean):
        assert m["nonfinite"] == 0
        assert _finite(m["angle_fit_deg"], m["angle_extrap_deg"], m["frob_fit"], m["frob_extrap"], m["drift_max"])
    for solve in so3_attitude.SOLVES:
        losses = result["losses"][solve]
        assert _finite(*losses) and result["final_train_loss"][solve] < losses[0]


def test_poincare_flow_smoke(tmp_path):
    result = poincare_flow.main(["--smoke", "--out", str(tmp_path)])
    md, rows = _outputs(tmp_path, "poincare_flow")
    assert "leave the disk" in md and "pinned" in md
    assert len(rows) == 2 * len(result["full_times"])
    assert result["formula_check"] < 1e-8  # the closed form matches a fine solve of the gradient flow
    ball, euclidean = result["metrics"]["ball"], result["metrics"]["euclidean"]
    # The ball solve never leaves the disk: at worst it is pinned at the clip radius, forward or backward.
    assert max(ball["max_norm"], ball["back_max_norm"]) <= result["clip"] + 1e-6 < 1
    # The barely trained Euclidean solve of the same model does leave it.
    assert max(euclidean["max_norm"], euclidean["back_max_norm"]) > 1
    for m in (ball, euclidean):
        assert _finite(m["dist_fit"], m["dist_extrap"], m["coord_fit"], m["coord_extrap"], m["back_dist_common"])
    for solve in poincare_flow.SOLVES:
        assert _finite(*result["losses"][solve])


def test_poincare_ball_and_euclidean_solves_agree_inside_the_clip_radius():
    # What the report says the manifold changes: nothing until a state reaches the clip radius.
    torch.manual_seed(0)
    field = poincare_flow.MLPField((2,), 8)
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(0.1)  # a slow field: nothing gets near the boundary
        x0 = 0.5 * torch.rand(16, 2)
        times = torch.linspace(0, 1, 6)
        ball = poincare_flow.rollout(field, x0, times, 2, "ball")
        plain = poincare_flow.rollout(field, x0, times, 2, "euclidean")
    assert ball.norm(dim=-1).max() < 0.9
    assert torch.equal(ball, plain)
