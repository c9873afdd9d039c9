"""Whole jobs: two-process DDP on CPU through the command line, and the main job's grid at smoke size."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from experiments import curves, sweep

ROOT = Path(__file__).parents[1]


def test_ddp_on_cpu_with_two_processes(tmp_path):
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(tmp_path), "name": "ddp"}}
    command = [
        sys.executable, "-m", "svflow_ode.training.cli", "fit",
        f"--config={ROOT / 'experiments/configs/base.yaml'}", f"--config={ROOT / 'experiments/configs/ddp_cpu.yaml'}",
        "--model.model.init_args.d_model=16", "--model.model.init_args.n_heads=2", "--data.n_pairs=4",
        "--data.n_queries=4", "--data.batch_size=8", "--data.val_size=16", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_model_summary=false", f"--trainer.logger={json.dumps([logger])}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr  # two processes joined the gloo group
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss") for r in rows)


def test_main_job_grid_smoke(tmp_path):
    # Euler and RK4 of the main job's grid (heun would add a third fit for nothing new), then the curves.
    out = tmp_path / "main_job"
    grid = ROOT / "experiments" / "grids" / "main_job.yaml"
    assert sweep.main([str(grid), "--smoke", "--out", str(out), "--only", "euler", "rk4", "--jobs", "2"]) == 0
    results = {point: json.loads((out / f"{point}_seed_everything-0" / "result.json").read_text())
               for point in ("euler", "rk4")}
    # One step per layer: RK4's four stages per step cost four times Euler's evaluations.
    assert results["rk4"]["val/nfe"] == 4 * results["euler"]["val/nfe"] > 0
    assert all(r["step"] == sweep.SMOKE["trainer.max_steps"] - 1 for r in results.values())
    for name in ("main_job.md", "main_job.csv", "main_job.png"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "main_job.md").read_text()
    assert "| euler |" in markdown and "| rk4 |" in markdown

    # Validated after 2 and 4 steps; any accuracy reaches 0 at the first validation, half-way through.
    assert curves.main([str(out), "--y", "val/acc", "--threshold", "0"]) == 0
    with open(out / "curves.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted((r["point"], r["step"]) for r in table) == [("euler", "2"), ("euler", "4"), ("rk4", "2"), ("rk4", "4")]
    runs = curves.per_run(curves.curve_rows(out, "val/acc"), "step", "val/acc", threshold=0)
    assert [(r["point"], r["first_reaching"]) for r in runs] == [("euler", 2), ("rk4", 2)]
    for run in runs:
        result = results[run["point"]]
        assert run["last"] == result["val/acc"] and run["wall_s_to_threshold"] == result["wall_s"] / 2
    assert "| euler | 0 |" in (out / "curves.md").read_text() and (out / "curves.png").stat().st_size > 0
