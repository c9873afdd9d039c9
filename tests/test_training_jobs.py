"""Whole jobs: two-process DDP on CPU through the command line, and the main job's smoke run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from experiments import main_job

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


def test_main_job_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main_job"])  # the CLI runs in-process; pytest's arguments are not for it
    threads = torch.get_num_threads()
    try:
        rows = main_job.main(["--smoke", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [r["solver"] for r in rows] == list(main_job.SOLVERS)
    for name in ("main_job.md", "main_job.csv", "main_job.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "main_job.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["solver"] for r in table] == list(main_job.SOLVERS)
    nfe = {r["solver"]: int(r["nfe_per_forward"]) for r in table}
    assert nfe["rk4"] == 4 * nfe["euler"] and all(r["steps"] == "4" for r in table)
    markdown = (tmp_path / "main_job.md").read_text()
    assert all(f"| {solver} |" in markdown for solver in main_job.SOLVERS)
