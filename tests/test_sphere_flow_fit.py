"""The sphere flow-fitting example runs end to end: its smoke run learns and writes its outputs."""

import torch

from experiments import sphere_flow_fit


def test_smoke_run_lowers_the_loss_and_writes_plot_and_report(tmp_path):
    result = sphere_flow_fit.main(["--smoke", "--no-progress", "--out", str(tmp_path)])
    assert result["final_train_loss"] < 0.7 * result["losses"][0]
    assert result["test_error"] < result["baseline_test_error"]
    # The learned trajectories stay on the unit sphere.
    assert (result["learned_test"].norm(dim=-1) - 1).abs().max() < 1e-5
    assert torch.isfinite(torch.tensor(result["losses"])).all()
    png, md = tmp_path / "sphere_flow_fit.png", tmp_path / "sphere_flow_fit.md"
    assert png.stat().st_size > 10_000
    assert "final train loss" in md.read_text() and "held-out trajectory error" in md.read_text()
