"""Each diagnostics experiment's --smoke run regenerates its md, png and csv."""

import math

from smoke_outputs import assert_outputs, read_csv

from experiments import gaussian_toy, metric_correlation, moe_collapse, solver_sweep, svflow_analyses


def test_gaussian_toy_smoke(tmp_path):
    out = tmp_path / "gaussian_toy"
    gaussian_toy.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert [float(r["beta"]) for r in rows] == [0.0, float("inf")]
    assert all(int(r["attractors"]) >= 1 for r in rows)


def test_moe_collapse_smoke(tmp_path):
    out = tmp_path / "moe_collapse"
    moe_collapse.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert {r["variant"] for r in rows} == {"none", "switch α=0.01", "consistency β=0.01"}
    for r in rows:
        assert 0.0 <= float(r["load_entropy_l0"]) <= 1.3863  # log 4


def test_svflow_analyses_smoke(tmp_path):
    out = tmp_path / "svflow_analyses"
    svflow_analyses.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert {r["model"] for r in rows} == {"char LM", "MiniLM"}
    lm = [r for r in rows if r["model"] == "char LM" and r["readout"] == "lens"]
    assert lm and all(r["d_nll"] != "" for r in lm)
    assert all(r["d_nll"] == "" for r in rows if r["model"] == "MiniLM")


def test_metric_correlation_smoke(tmp_path):
    # The solver sweep's own smoke run trains and saves the models (2 seeds of every configuration).
    models = tmp_path / "models"
    solver_sweep.main(["--smoke", "--out", str(tmp_path / "solver_sweep"), "--save-dir", str(models)])
    out = tmp_path / "metric_correlation"
    metric_correlation.main(["--smoke", "--models", str(models), "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert len(rows) == len(list(models.glob("*.pt"))) >= 3
    assert {r["arch"] for r in rows} == {"flow", "post_ln"}
    for r in rows:
        assert all(math.isfinite(float(r[m])) for m in metric_correlation.METRICS)
    assert "| KL(q||p) |" in out.with_suffix(".md").read_text()
