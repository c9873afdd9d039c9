"""The solver and depth sweeps' grids, the curves of a sweep, and the re-integration experiment's --smoke run."""

import json
from pathlib import Path

import pytest
import torch
from smoke_outputs import assert_outputs, read_csv

from experiments import curves, reintegrate_minilm, sweep
from experiments.evaluate import load
from svflow_ode.flops import training_flops_per_token
from svflow_ode.training.depth import depth_options

GRIDS = Path(__file__).resolve().parents[1] / "experiments" / "grids"
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rkmk4": 4}


@pytest.fixture(autouse=True)
def _threads():
    # The experiments set torch's thread count for the whole process; later tests get theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def grid_models(name: str):
    """Each point of a shipped grid at its smoke size (seed 0), untrained: ``(point, model, evaluate entry)``.

    The model is built from the point's merged configuration as the CLI builds it (vocabulary and
    context from the data: Tiny Shakespeare's 65 characters).
    """
    grid = sweep.load_grid(GRIDS / f"{name}.yaml", smoke=True)
    for run in grid["runs"]:
        if run["axes"]["seed_everything"] == 0:
            config = sweep.merged(sweep.loaded_config(grid["base"]), sweep.nested(run["overrides"]))
            torch.manual_seed(0)
            spec = config["model"]["model"]
            model = load(spec["class_path"])(**spec["init_args"], vocab_size=65,
                                             context=config["data"]["init_args"]["context"])
            yield run["point"], model.eval(), run["evaluate"]


def test_solver_sweep_grid_points():
    ids = torch.randint(65, (2, 64))
    nfe, flops = {}, {}
    with torch.no_grad():
        for point, model, _ in grid_models("solver_sweep"):
            nfe[point] = model(ids).stats.nfe
            flops[point] = training_flops_per_token(model, nfe[point], model.context)
            if model.method != "dopri5":
                terms = 2 if model.norm == "post_ln" else 1  # Lie splitting counts attention and FFN apart
                assert nfe[point] == model.steps * STAGES[model.method] * terms, point
    K = 4  # parameter sets
    assert set(nfe) == {"post_ln_euler_x4", "flow_euler_x4", "flow_midpoint_x4", "flow_heun_x4", "flow_rk4_x4",
                        "flow_rkmk4_x4", "flow_dopri5", "flow_euler_x8", "flow_rk4_x2", "flow_rkmk4_x2"}
    # Matched FLOPs: every 2K-evaluation point costs the same; dopri5 restarts at each block (one
    # evaluation) and takes at least one step there (six more).
    matched = ("flow_euler_x8", "flow_midpoint_x4", "flow_heun_x4", "flow_rk4_x2", "flow_rkmk4_x2")
    assert len({flops[point] for point in matched}) == 1 and nfe["flow_euler_x8"] == 2 * K
    assert nfe["flow_dopri5"] >= 7 * K


def test_depth_sweep_grid_evaluates_every_model():
    # Trained with N = 8 Euler steps; evaluated at N/4..4N steps, a per-step model at up to its 8 layers.
    ids = torch.randint(65, (2, 64))
    points = set()
    with torch.no_grad():
        for point, model, evaluate in grid_models("depth_sweep"):
            points.add(point)
            assert evaluate["function"] == "svflow_ode.training.depth:depth_curve"
            depths = evaluate["args"]["depths"]
            assert depths == ([2, 4, 8] if model.time == "per_step" else [2, 4, 8, 16, 32]), point
            for depth in depths:  # depth_options refuses a depth the model cannot run at
                assert model(ids, **depth_options(model, depth)).stats.nfe == depth, (point, depth)
    assert points == {"per_step", "shared", "continuous", "shared_random_n", "continuous_random_n"}


def test_curves_of_evaluated_depths(tmp_path):
    # A sweep's finished points as the runner leaves them, each evaluated at depths 2 and 4.
    losses = {("a", 0): (3.0, 2.0), ("a", 1): (3.2, 2.4), ("b", 0): (2.5, 2.5), ("b", 1): (2.7, 2.5)}
    for (point, seed), (at2, at4) in losses.items():
        directory = tmp_path / f"{point}_seed_everything-{seed}"
        directory.mkdir()
        evaluation = [{"depth": 2, "loss": at2, "nfe": 2}, {"depth": 4, "loss": at4, "nfe": 4}]
        (directory / "result.json").write_text(json.dumps({"step": 3.0, "wall_s": 1.0, "evaluation": evaluation}))
    assert curves.main([str(tmp_path), "--depth"]) == 0
    assert len(read_csv(tmp_path / "curves.csv")) == 8 and (tmp_path / "curves.png").stat().st_size > 0
    rows = curves.curve_rows(tmp_path, "loss", depth=True)
    means = {(m["point"], m["depth"]): m for m in curves.means(rows, "depth", "loss")}
    assert means["a", 2]["loss"] == pytest.approx(3.1) and means["a", 2]["se"] == pytest.approx(0.1)
    assert means["b", 4] == {"point": "b", "depth": 4, "loss": 2.5, "se": 0.0, "seeds": 2}
    ranges = {(r["point"], r["seed_everything"]): r["range"] for r in curves.per_run(rows, "depth", "loss")}
    assert ranges == pytest.approx({("a", 0): 1.0, ("a", 1): 0.8, ("b", 0): 0.0, ("b", 1): 0.2})
    assert "| a | 2 | 3.1 | 0.1 | 2 |" in (tmp_path / "curves.md").read_text()


def test_reintegrate_minilm_smoke(tmp_path):
    out = tmp_path / "minilm_reintegration"
    reintegrate_minilm.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert [r["method"].split(" ")[0] for r in rows] == [m for m, _ in reintegrate_minilm.METHODS]
    original = rows[0]
    assert float(original["cos_min"]) > 1 - 1e-12 and float(original["spearman"]) == pytest.approx(1.0)
    # NFE: steps x 2 terms (attention, FFN) x stages.
    for r, (method, steps) in zip(rows, reintegrate_minilm.METHODS):
        assert int(r["nfe"]) == 2 * steps * STAGES[method]
        assert -1.0 <= float(r["spearman"]) <= 1.0 and 0.0 <= float(r["top1_agreement"]) <= 1.0
