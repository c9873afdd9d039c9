"""The sweep runner (``experiments.sweep``) and the report module (``experiments.report``)."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from experiments import report, sweep

BASE = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "base.yaml"
GRIDS = Path(__file__).resolve().parents[1] / "experiments" / "grids"
TINY = {  # associative recall with a one-block, 16-wide model: seconds per point
    "model.model.init_args.d_model": 16, "model.model.init_args.d_ff": 32,
    "model.model.init_args.n_heads": 2, "model.model.init_args.n_blocks": 1,
    "trainer.enable_model_summary": False,
    # Only the CSV logger: the base config's wandb would start a service process per point.
    "trainer.logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}],
}


def write_grid(tmp_path, **entries) -> Path:
    grid = {"name": "study", "base": [str(BASE)], "out": str(tmp_path / "out"), "overrides": TINY,
            "axes": {"seed_everything": [0, 1]}, **entries}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_smoke_grid_end_to_end(tmp_path, capsys):
    points = {"euler": {"model.model.init_args.method": "euler"},
              "heun": {"model.model.init_args.method": "heun"},
              "broken": {"model.model.init_args.method": "no_such_solver"},
              "rkmk4": {"refused": "rkmk4 has no action on the LayerNorm sphere"}}
    # fit only: a test subcommand per point would double the file's time (its command is checked below).
    grid = write_grid(tmp_path, points=points,
                      report={"baseline": "euler", "plot": {"x": "train_flops_per_token", "y": "val/loss",
                                                            "group": "point"}})
    out = tmp_path / "out"
    smoke = ["--smoke", "--out", str(out)]
    assert sweep.main([str(grid), *smoke, "--jobs", "2"]) == 1  # the broken point failed

    for method in ("euler", "heun"):
        for seed in (0, 1):
            directory = out / f"{method}_seed_everything-{seed}"
            result = json.loads((directory / "result.json").read_text())
            hparams = torch.load(directory / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
            assert hparams["model"]["init_args"]["method"] == method == result["method"]
            assert yaml.safe_load((directory / "config.yaml").read_text())["seed_everything"] == seed
            assert result["step"] == sweep.SMOKE["trainer.max_steps"] - 1
            assert math.isfinite(result["val/loss"]) and math.isfinite(result["val/acc"])
            assert result["params"] > 0 and result["train_flops_per_token"] > 0
    euler = json.loads((out / "euler_seed_everything-0" / "result.json").read_text())
    heun = json.loads((out / "heun_seed_everything-0" / "result.json").read_text())
    assert heun["train_flops_per_token"] > euler["train_flops_per_token"]  # two field evaluations per step

    failed = json.loads((out / "broken_seed_everything-0" / "failed.json").read_text())
    assert failed["exit_status"] == 2 and "no_such_solver" in failed["error"]
    assert not (out / "rkmk4_seed_everything-0").exists()

    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["point"], r["status"]) for r in rows) == sorted(
        [("euler", "done")] * 2 + [("heun", "done")] * 2 + [("broken", "failed")] * 2 + [("rkmk4", "refused")] * 2)
    md = (out / "study.md").read_text()
    assert "rkmk4 has no action on the LayerNorm sphere" in md and "no_such_solver" in md
    assert "| heun | euler | val/loss |" in md and (out / "study.png").stat().st_size > 0

    # Finished points are skipped; a point with a checkpoint and no result resumes from it.
    capsys.readouterr()
    assert sweep.main([str(grid), *smoke, "--only", "euler", "heun"]) == 0
    assert capsys.readouterr().out.count("skipped") == 4
    (out / "heun_seed_everything-1" / "result.json").unlink()
    grid.write_text(yaml.safe_dump({**yaml.safe_load(grid.read_text()), "commands": ["fit", "test"]}))
    assert sweep.main([str(grid), *smoke, "--only", "heun", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    last = out / "heun_seed_everything-1" / "checkpoints" / "last.ckpt"
    fit, test = [line for line in printed if "heun_seed_everything-1/" in line and "svflow_ode" in line]
    assert " fit " in fit and fit.endswith(f"--ckpt_path={last}")
    assert " test " in test and test.endswith(f"--ckpt_path={last}")
    assert yaml.safe_load((last.parents[1] / "test.yaml").read_text())["trainer"]["logger"] == [
        {"class_path": sweep.CSV_LOGGER, "init_args": {"save_dir": str(last.parents[1]), "name": "", "version": "test"}}]


@pytest.mark.parametrize("entries, message", [
    ({"points": {"a": {}}, "colour": "red"}, "unknown keys ['colour']"),
    ({"points": {}}, "the grid has no points"),
    ({"points": {"a": {}}, "base": ["missing.yaml"]}, "base config not found"),
    ({"points": {"a": {}}, "commands": ["test"]}, "commands must be [fit] or [fit, test]"),
    ({"points": {"a": {}}, "report": {"colour": 1}}, "unknown report keys ['colour']"),
    ({"points": {"a": {"trainer.callbacks": []}}}, "point a_seed_everything-0: the configuration needs a ModelCheckpoint"),
    ({"points": {"a": {}}, "evaluate": {"function": "depth_curve"}}, "evaluate must be {function: 'module:name'"),
    ({"points": {"a": {"evaluate": [1]}}, "evaluate": {"function": "m:f"}}, "point a: evaluate must map the function"),
])
def test_bad_grid_files_are_one_line_errors(tmp_path, capsys, entries, message):
    assert sweep.main([str(write_grid(tmp_path, **entries))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_overrides_nest_and_merge():
    assert sweep.nested({"model.model.init_args.method": "rk4", "trainer.max_steps": 3, "seed_everything": 1}) == {
        "model": {"model": {"init_args": {"method": "rk4"}}}, "trainer": {"max_steps": 3}, "seed_everything": 1}
    assert sweep.merged({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


@pytest.mark.parametrize("grid", sorted(GRIDS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_grids_load(grid):
    loaded = sweep.load_grid(grid, smoke=True)
    assert loaded["runs"]


def test_paired_difference_by_hand():
    rows = [{"point": "a", "seed": 0, "loss": 1.0}, {"point": "a", "seed": 1, "loss": 2.0},
            {"point": "a", "seed": 2, "loss": 4.0},
            {"point": "b", "seed": 0, "loss": 1.5}, {"point": "b", "seed": 1, "loss": 1.5},
            {"point": "b", "seed": 3, "loss": 9.0}, {"point": "b", "seed": 2, "loss": None}]
    # Shared seeds with a value: 0 and 1; differences -0.5 and 0.5: mean 0, sd sqrt(0.5), se 0.5.
    assert report.paired_difference(rows, "loss", "a", "b", pair="seed") == {"mean": 0.0, "se": 0.5, "n": 2}
    assert report.paired_difference(rows, "loss", "a", "c", pair="seed") is None


def test_report_files(tmp_path):
    rows = [{"point": p, "seed": s, "x": 10.0 * (i + 1), "loss": 2.0 - 0.1 * i + 0.01 * s}
            for i, p in enumerate("ab") for s in range(3)]
    fields = {"title": "t", "command": "c", "grid": "g", "program": "svflow-ode", "table": report.markdown_table(rows, ["point", "loss"]),
              "differences": "d", "refused": "none", "failed": "none"}
    paths = report.write_study("t", rows, tmp_path, "sweep", fields,
                               plot_spec={"x": "x", "y": "loss", "group": "point", "logx": True})
    assert [p.name for p in paths] == ["t.csv", "t.png", "t.md"]
    assert "| a | 2 |" in (tmp_path / "t.md").read_text() and "its own `svflow-ode fit`" in (tmp_path / "t.md").read_text()
    mean, se = statistics.fmean([2.0, 2.01, 2.02]), statistics.stdev([2.0, 2.01, 2.02]) / math.sqrt(3)
    assert report.mean_se([2.0, 2.01, 2.02]) == pytest.approx((mean, se))


def test_points_run_seed_by_seed(tmp_path):
    points = {"euler": {}, "heun": {"model.model.init_args.method": "heun"}}
    grid = sweep.load_grid(write_grid(tmp_path, points=points))
    started = []
    rows = sweep.sweep(grid, dry_run=True, progress=lambda line: started.append(line.split()[-1])
                       if " start " in line else None)
    # Every point of seed 0 before any of seed 1; the rows come back in grid order.
    assert started == ["euler_seed_everything-0", "heun_seed_everything-0",
                       "euler_seed_everything-1", "heun_seed_everything-1"]
    assert [r["name"] for r in rows] == ["euler_seed_everything-0", "euler_seed_everything-1",
                                         "heun_seed_everything-0", "heun_seed_everything-1"]


def test_verdict_against_several_baselines():
    def diff(point, baseline, mean, se, n=3):
        return {"point": point, "baseline": baseline, "metric": "val/loss", "mean": mean, "se": se, "n": n}

    differences = [
        diff("rk4", "euler", -0.05, 0.01), diff("rk4", "wide", -0.03, 0.005),    # beats both beyond 2 SE
        diff("heun", "euler", -0.05, 0.01), diff("heun", "wide", -0.03, 0.02),   # -0.03 + 2 * 0.02 > 0: noise
        diff("mid", "euler", -0.01, 0.001), diff("mid", "wide", 0.04, 0.01),     # under the margin, then worse
        diff("one", "euler", -0.5, 0.0, n=1), diff("one", "wide", -0.5, 0.0, n=1),  # one seed: no verdict
        diff("lone", "euler", -0.05, 0.01),                                      # never ran beside wide
        diff("euler", "wide", 0.01, 0.01),                                       # a baseline: not judged
    ]
    lines = sweep.verdict(differences, ["euler", "wide"], 0.02).splitlines()
    assert lines == [
        "- rk4: beats every baseline by at least 0.02 beyond 2 standard errors",
        "- heun: no win (beats 1 of 2 baselines by 0.02; against wide -0.0300 +/- 0.0200)",
        "- mid: no win (beats 0 of 2 baselines by 0.02; against wide +0.0400 +/- 0.0100)",
        "- one: no win (beats 0 of 2 baselines by 0.02; against euler -0.5000 +/- 0.0000)",
        "- lone: not compared with wide (no shared seeds)",
    ]
    assert sweep.verdict(differences, ["euler"], None).startswith("no margin set")


def test_evaluation_runs_after_the_fit_and_lands_in_the_result(tmp_path):
    depth_curve = "svflow_ode.training.depth:depth_curve"
    grid = write_grid(tmp_path, axes={"seed_everything": [0]}, evaluate={"function": depth_curve, "args": {"depths": [1, 2]}},
                      points={"two": {"model.model.init_args.n_blocks": 2, "data.init_args.val_size": 128},
                              "plain": {"evaluate": None}})  # 128 windows: the smoke run's 2 validation batches
    out = tmp_path / "out"
    assert sweep.main([str(grid), "--smoke", "--out", str(out)]) == 0
    result = json.loads((out / "two_seed_everything-0" / "result.json").read_text())
    assert result["commands"][-1].split()[2:5] == ["experiments.evaluate", str(out / "two_seed_everything-0"), depth_curve]
    curve = result["evaluation"]
    assert [(e["depth"], e["layers"]) for e in curve] == [(1, [0]), (2, [0, 1])]
    # The full depth is the model the fit validated: the same loss on the same windows.
    assert curve[1]["loss"] == pytest.approx(result["val/loss"], rel=1e-6)
    assert curve[0]["forward_flops_per_token"] < curve[1]["forward_flops_per_token"]
    assert "evaluation" not in json.loads((out / "plain_seed_everything-0" / "result.json").read_text())


def test_depth_study_rows_comparisons_and_claim():
    from experiments import elastic_depth

    def curve(losses, flops=(10.0, 20.0)):
        return [{"depth": d, "loss": x, "forward_flops_per_token": f} for d, x, f in zip((1, 2), losses, flops)]

    results = [
        {"point": "elastic_euler", "seed_everything": 0, "evaluation": curve([3.0, 2.0])},
        {"point": "elastic_euler", "seed_everything": 1, "evaluation": curve([3.2, 2.2])},
        {"point": "layerdrop_0.2", "seed_everything": 0, "evaluation": curve([3.5, 2.0])},
        {"point": "layerdrop_0.2", "seed_everything": 1, "evaluation": curve([3.5, 2.1])},
        {"point": "transformer_1", "seed_everything": 0, "evaluation": curve([2.9])},
        {"point": "transformer_1", "seed_everything": 1, "evaluation": curve([3.2])},
    ]
    study_v2 = [{"point": "transformer_8", "seed_everything": 0, "val/loss": 1.5},
                {"point": "euler_x4", "seed_everything": 0, "val/loss": 1.9},  # a depth this study has no curve at
                {"point": "rk4_x4", "seed_everything": 0, "val/loss": 1.0}]    # no separately trained Transformer
    rows = elastic_depth.depth_rows(results, study_v2)
    assert [(r["point"], r["seed_everything"], r["loss"]) for r in rows if r["model"] == "separate"] == [
        ("separate@1", 0, 2.9), ("separate@1", 1, 3.2), ("separate@4", 0, 1.9), ("separate@8", 0, 1.5)]
    assert next(r for r in rows if r["point"] == "separate@8")["forward_flops_per_token"] is None
    differences = {(d["depth"], d["against"]): d for d in elastic_depth.comparisons(rows)}
    assert differences[1, "layerdrop_0.2"] == {"depth": 1, "against": "layerdrop_0.2", "mean": pytest.approx(-0.4),
                                               "se": pytest.approx(0.1), "n": 2}
    assert differences[1, "separate"]["mean"] == pytest.approx(0.05) and differences[1, "separate"]["se"] == pytest.approx(0.05)
    assert differences[2, "layerdrop_0.2"]["mean"] == pytest.approx(0.05)
    assert elastic_depth.claim(list(differences.values())).splitlines() == [
        "- depth 1: matches or beats every LayerDrop model: yes; within 0.02 nats of the Transformer trained at "
        "this depth: no (+0.0500 +/- 0.0500)",
        # +0.05 +/- 0.05: not above zero by more than 2 standard errors.
        "- depth 2: matches or beats every LayerDrop model: yes; within 0.02 nats of the Transformer trained at "
        "this depth: not measured"]
    # A separately trained model whose FLOPs differ from LayerDrop's at its depth is another model: refused.
    results[4]["evaluation"] = curve([2.9], flops=(11.0,))
    with pytest.raises(ValueError, match="a 1-layer Transformer costs 11.0 FLOPs per token, LayerDrop pruned"):
        elastic_depth.depth_rows(results, [])
