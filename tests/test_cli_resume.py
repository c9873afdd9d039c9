"""Resuming through ``svflow-ode fit --ckpt_path``: ``last`` across runs, run directories, overrides, SIGTERM."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from svflow_ode.training import SigtermCheckpoint
from svflow_ode.training.checkpoints import load_checkpoint
from svflow_ode.training.cli import reserve_version, run

ROOT = Path(__file__).parents[1]
BASE = str(ROOT / "experiments" / "configs" / "base.yaml")
SMALL = ["--model.model.init_args.d_model=16", "--model.model.init_args.n_heads=2", "--data.batch_size=8",
         "--data.val_size=16", "--trainer.enable_model_summary=false"]
# The shipped configuration (its CSV logger under runs/svflow, its ModelCheckpoint without a
# dirpath, its progress bar), only smaller, and without its W&B logger: an offline W&B run starts
# W&B's service process, and a disabled one leaves W&B disabled for the rest of the test session.
CSV = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "svflow"}}]
SHIPPED = [f"--config={BASE}", *SMALL, f"--trainer.logger={json.dumps(CSV)}"]
QUIET = [f"--config={BASE}", *SMALL, "--trainer.enable_progress_bar=false", "--trainer.logger=false",
         "--trainer.callbacks=[]"]


pytestmark = pytest.mark.usefixtures("cli_in_tmp")


def checkpoints_every(steps: int, dirpath) -> str:
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(dirpath), "save_last": True, "every_n_train_steps": steps}}
    return f"--trainer.callbacks={json.dumps([callback])}"


def error_line(capsys) -> str:
    """The one line of stderr that reports the error (Lightning's own log lines aside), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_ckpt_path_last_resumes_the_previous_run_of_the_shipped_config(tmp_path):
    first = run(["fit", *SHIPPED, "--trainer.max_steps=4", "--trainer.val_check_interval=2"])
    resumed = run(["fit", *SHIPPED, "--trainer.max_steps=6", "--trainer.val_check_interval=2",
                   "--trainer.log_every_n_steps=1", "--ckpt_path=last"])
    first_dir, resumed_dir = Path(first.trainer.log_dir), Path(resumed.trainer.log_dir)
    assert (first_dir.name, resumed_dir.name) == ("version_0", "version_1")  # runs/svflow/version_N
    assert Path(resumed.trainer.ckpt_path) == first_dir / "checkpoints" / "last.ckpt"
    assert resumed.trainer.global_step == 6
    with open(resumed_dir / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert steps == [4, 5]  # trained on from step 4, not from 0
    # The saved configuration names the file resumed from, and leaves the version to the next run.
    saved = (resumed_dir / "config.yaml").read_text()
    assert f"ckpt_path: {first_dir / 'checkpoints' / 'last.ckpt'}" in saved and "version: null" in saved


def test_ckpt_path_last_without_a_last_checkpoint_is_an_error_that_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *SHIPPED, "--trainer.max_steps=2", "--ckpt_path=last"])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "--ckpt_path last: no last checkpoint in runs/svflow/*/checkpoints, so nothing to resume" in line
    assert not any(tmp_path.iterdir())


def test_runs_started_together_get_their_own_directories(tmp_path):
    # Run A has been built (the slow start-up: imports, data, model) and has chosen its directory,
    # but not written to it yet, when run B starts: B must not choose the same one. (The loggers
    # choose the next number after those they list, so without a reservation both got version_0.)
    a = run([*SHIPPED, "--trainer.max_steps=1", "--trainer.val_check_interval=1"], run=False)
    a_dir = Path(a.trainer.log_dir)
    b = run(["fit", *SHIPPED, "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    a.trainer.fit(a.model, a.datamodule)
    b_dir = Path(b.trainer.log_dir)
    assert a_dir != b_dir and {a_dir.name, b_dir.name} == {"version_0", "version_1"}
    for run_dir in (a_dir, b_dir):
        assert (run_dir / "metrics.csv").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_version_reservation_is_atomic_under_concurrency(tmp_path):
    versions, start = [], threading.Barrier(8)

    def reserve():
        start.wait()
        versions.append(reserve_version(tmp_path / "runs" / "svflow")[0])

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(8))
    assert sorted(p.name for p in (tmp_path / "runs" / "svflow").iterdir()) == [f"version_{v}" for v in range(8)]


@pytest.mark.parametrize("override, differs", [
    ("--model.model.init_args.d_model=32", "model.model.init_args.d_model: 16 (checkpoint) vs 32 (here)"),
    ("--model.lr=0.01", "model.lr: 0.001 (checkpoint) vs 0.01 (here)"),  # same shapes: silently ignored before
    ("--model.model.init_args.method=rk4", "model.model.init_args.method: 'euler' (checkpoint) vs 'rk4' (here)"),
])
def test_resuming_with_a_differing_model_configuration_is_refused(tmp_path, capsys, override, differs):
    run(["fit", *QUIET, "--trainer.max_steps=1", checkpoints_every(1, "ck")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *QUIET, "--trainer.max_steps=2", checkpoints_every(1, "ck"), "--ckpt_path=ck/last.ckpt", override])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "ck/last.ckpt was trained with another model configuration: " in line and differs in line
    assert load_checkpoint("ck/last.ckpt")["global_step"] == 1  # nothing trained on


def test_sigterm_saves_a_checkpoint_exits_143_and_the_run_resumes_to_the_same_result(tmp_path):
    # An endless run (trainer.max_steps far away; the schedule's length fixed by model.max_steps).
    common = ["fit", *QUIET, "--model.max_steps=1000", "--trainer.val_check_interval=1000", checkpoints_every(2, "ck")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "svflow_ode.training.cli", *common, "--trainer.max_steps=100000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "ck" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)  # as a batch scheduler does at the end of a job's time
    _, err = child.communicate(timeout=120)
    err = err.decode()
    assert child.returncode == SigtermCheckpoint.EXIT_STATUS == 143, err[-3000:]
    stopped_at = load_checkpoint(last)["global_step"]
    assert 2 <= stopped_at < 100000 and "Traceback" not in err
    assert (f"svflow-ode: stopped by SIGTERM after step {stopped_at}; state saved to {last}: "
            f"resume with --ckpt_path last (exit status 143)") in err
    # Resumed with `last`, the run goes on from there, and ends where an uninterrupted one does.
    resumed = run([*common, f"--trainer.max_steps={stopped_at + 3}", "--ckpt_path=last"])
    assert Path(resumed.trainer.ckpt_path) == Path("ck/last.ckpt") and resumed.trainer.global_step == stopped_at + 3
    whole = run([*common[:-1], checkpoints_every(2, "whole"), f"--trainer.max_steps={stopped_at + 3}"])
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
