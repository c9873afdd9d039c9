"""Each diagnostics experiment's --smoke run regenerates its md, png and csv."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from smoke_outputs import assert_outputs, read_csv

from experiments import gaussian_toy, metric_correlation, moe_collapse, svflow_analyses, sweep
from experiments.fit import validation_loss

SOLVER_SWEEP = Path(__file__).resolve().parents[1] / "experiments" / "grids" / "solver_sweep.yaml"


def test_gaussian_toy_smoke(tmp_path):
    out = tmp_path / "gaussian_toy"
    gaussian_toy.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert [float(r["beta"]) for r in rows] == [0.0, float("inf")]
    assert all(int(r["attractors"]) >= 1 for r in rows)


def test_moe_collapse_smoke(tmp_path):
    out = tmp_path / "moe_collapse"
    moe_collapse.main(["--smoke", "--out", str(out), "--runs", str(tmp_path / "runs")])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert {r["variant"] for r in rows} == {"none", "switch α=0.01", "consistency β=0.01"}
    for r in rows:
        assert 0.0 <= float(r["load_entropy_l0"]) <= 1.3863  # log 4


def test_svflow_analyses_smoke(tmp_path):
    out = tmp_path / "svflow_analyses"
    svflow_analyses.main(["--smoke", "--out", str(out), "--runs", str(tmp_path / "runs")])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert {r["model"] for r in rows} == {"char LM", "MiniLM"}
    lm = [r for r in rows if r["model"] == "char LM" and r["readout"] == "lens"]
    assert lm and all(r["d_nll"] != "" for r in lm)
    assert all(r["d_nll"] == "" for r in rows if r["model"] == "MiniLM")


def test_switch_loss_enters_as_its_gradient():
    # MoELM(switch_alpha) adds the Switch loss's gradient to the routers' probabilities; written out
    # as a loss term beside the cross-entropy, it gives every parameter the same gradient.
    torch.manual_seed(0)
    ids, targets = torch.randint(20, (4, 8)), torch.randint(20, (4, 8))
    models = {alpha: moe_collapse.MoELM(20, d_model=16, n_heads=2, n_blocks=2, context=8, switch_alpha=alpha)
              for alpha in (0.5, 0.0)}
    models[0.0].load_state_dict(models[0.5].state_dict())
    reference = moe_collapse.MoELM(20, d_model=16, n_heads=2, n_blocks=2, context=8)
    reference.load_state_dict(models[0.5].state_dict())

    def cross_entropy(out):
        return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())

    cross_entropy(models[0.5](ids)).backward()
    cross_entropy(models[0.0](ids)).backward()
    with moe_collapse.recorded_router_probs(reference) as calls:
        out = reference(ids)
    switch = []
    for probs in calls:
        probs = probs.flatten(0, -2)
        share = torch.bincount(probs.argmax(-1), minlength=4).to(probs.dtype) / len(probs)  # f_e
        switch.append(4 * (share * probs.mean(0)).sum())
    (cross_entropy(out) + 0.5 * torch.stack(switch).mean()).backward()
    assert len(calls) == 2  # one router call per block with Euler
    for hooked, written in zip(models[0.5].parameters(), reference.parameters()):
        assert (hooked.grad is None) == (written.grad is None)
        if hooked.grad is not None:
            assert torch.allclose(hooked.grad, written.grad, atol=1e-7)
    routers = [m.blocks[0].terms[1].field.router.weight.grad for m in (models[0.5], models[0.0])]
    assert not torch.allclose(*routers)  # the term is not nothing


def test_metric_correlation_smoke(tmp_path):
    # Models from the solver sweep's own grid at its smoke size: the post-LN reference (one seed)
    # and Heun on the sweep architecture (two seeds), with the CSV log only (no wandb per point).
    grid = yaml.safe_load(SOLVER_SWEEP.read_text())
    grid["base"] = [str((SOLVER_SWEEP.parent / base).resolve()) for base in grid["base"]]
    grid["overrides"]["trainer.logger"] = False
    path = tmp_path / "solver_sweep.yaml"
    path.write_text(yaml.safe_dump(grid))
    models = tmp_path / "models"
    only = ["post_ln_euler_x4_seed_everything-0", "flow_heun_x4_seed_everything-0", "flow_heun_x4_seed_everything-1"]
    assert sweep.main([str(path), "--smoke", "--out", str(models), "--jobs", "3", "--only", *only]) == 0
    out = tmp_path / "metric_correlation"
    metric_correlation.main(["--smoke", "--models", str(models), "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert sorted((r["run"], r["seed"]) for r in rows) == [("flow_heun_x4", "0"), ("flow_heun_x4", "1"),
                                                           ("post_ln_euler_x4", "0")]
    assert {r["arch"] for r in rows} == {metric_correlation.FLOW, "post_ln"}
    for r in rows:
        assert all(math.isfinite(float(r[m])) for m in metric_correlation.METRICS)
    assert "| KL(q||p) |" in out.with_suffix(".md").read_text()
    # A sweep model reloads to the validation loss its fit logged, on the data module it trained on.
    model, record = metric_correlation.load_sweep_models(models)[0]
    data, _ = metric_correlation.sweep_data(models, record["run"], record["seed"])
    result = json.loads((models / f"{record['run']}_seed_everything-{record['seed']}" / "result.json").read_text())
    assert validation_loss(model, data) == pytest.approx(result["val/loss"], rel=1e-5) == record["val_loss"]
