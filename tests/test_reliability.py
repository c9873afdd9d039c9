"""Faults lose nothing and explain themselves: non-finite training, kills, hostile or mismatched checkpoints."""

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from solvers import NonFiniteError
from svflow_ode.lm import SVFlowLM
from svflow_ode.training import (
    AssociativeRecallDataModule, AtomicCheckpointIO, FiniteGuard, LitSVFlow, NonFiniteTrainingError,
)
from svflow_ode.training.checkpoints import UntrustedCheckpointError, load_checkpoint
from svflow_ode.training.cli import run
from svflow_ode.training.sample import sample

ROOT = Path(__file__).parents[1]
TINY = [
    f"--config={ROOT / 'experiments/configs/base.yaml'}", "--model.model.init_args.d_model=16",
    "--model.model.init_args.n_heads=2", "--data.n_pairs=4", "--data.n_queries=4", "--data.batch_size=8",
    "--data.val_size=16", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]


pytestmark = pytest.mark.usefixtures("cli_in_tmp")


def checkpoints_every(steps: int, dirpath) -> str:
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(dirpath), "save_last": True, "every_n_train_steps": steps,
                              "save_top_k": -1}}
    return f"--trainer.callbacks={json.dumps([callback])}"


def tensors(tree):
    """Every tensor in a nested container."""
    if torch.is_tensor(tree):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in tensors(item)]


def weights(checkpoint):
    """The model's and the optimizer's tensors in a checkpoint."""
    return tensors([checkpoint["state_dict"], checkpoint["optimizer_states"]])


def test_the_guard_is_on_by_default_and_saves_the_state_before_the_bad_step(tmp_path):
    # A learning rate of 1e30 sends the weights to ~1e28 in one step; the next forward overflows.
    # The configuration lists its own callbacks and no guard: the CLI adds it all the same.
    with pytest.raises(NonFiniteTrainingError) as info:
        run(["fit", *TINY, "--model.lr=1e30", "--model.min_lr=0", "--trainer.max_steps=5",
             checkpoints_every(1, tmp_path / "ck")])
    message = str(info.value)
    # The embedding overflows: the solver refuses its non-finite y0, and the guard reports and saves.
    for part in ["training step 1 turned non-finite in the forward pass: y0 contains NaN or infinite entries: "
                 "shape (8, 15, 16), 1920 nan and 0 inf",
                 "first module to turn finite inputs non-finite: model.embed.norm (LayerNorm)",
                 "first non-finite state: initial (t=0): shape (8, 15, 16), 1920 nan and 0 inf",
                 f"weights and optimizer state before step 1 saved to {tmp_path / 'ck' / 'nonfinite-step1.ckpt'}"]:
        assert part in message
    saved = load_checkpoint(tmp_path / "ck" / "nonfinite-step1.ckpt")
    assert saved["global_step"] == 1 and all(torch.isfinite(t).all() for t in weights(saved))
    # Exactly the state the periodic checkpoint wrote after step 0: the bad update was never applied.
    periodic = load_checkpoint(tmp_path / "ck" / "epoch=0-step=1.ckpt")
    assert saved["state_dict"].keys() == periodic["state_dict"].keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(saved), weights(periodic), strict=True))
    model = LitSVFlow.load_from_checkpoint(tmp_path / "ck" / "nonfinite-step1.ckpt").model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_the_guard_the_solvers_own_check_still_stops_the_run(tmp_path):
    # Nothing is saved then, but the run does not train on NaN: the solve names the bad state.
    with pytest.raises(NonFiniteError, match="y0 contains NaN or infinite entries"):
        run(["fit", *TINY, "--finite_guard=false", "--model.lr=1e30", "--model.min_lr=0",
             "--trainer.max_steps=3", "--trainer.callbacks=[]"])


class Poison(L.Callback):
    """Before training step ``step``, change the weights of block 1's attention."""

    def __init__(self, step: int, scale: float):
        self.step, self.scale = step, scale

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            attention = pl_module.model.blocks[1].terms[0].field
            with torch.no_grad():
                attention.q.weight.mul_(self.scale)
                attention.k.weight.mul_(self.scale)


@pytest.mark.parametrize("scale", [1e30, math.nan])
def test_the_guard_names_the_block_time_and_step_where_the_state_broke(tmp_path, scale):
    model = LitSVFlow(SVFlowLM(vocab_size=32, d_model=16, n_heads=2, n_blocks=2, context=15), max_steps=4)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                        callbacks=[Poison(2, scale), FiniteGuard(dirpath=tmp_path)])
    data = AssociativeRecallDataModule(n_pairs=4, n_queries=4, n_keys=16, n_values=16, batch_size=8, val_size=8)
    with pytest.raises(NonFiniteTrainingError) as info:
        trainer.fit(model, data)
    message = str(info.value)
    if math.isnan(scale):
        # torch's attention keeps NaN query/key weights out of the forward pass (the loss stays
        # finite), not out of the gradients: the guard stops the update, and the weights themselves
        # are gone, so nothing is worth saving.
        assert re.search(r"training step 2 turned non-finite \(loss [0-9.]+\)", message), message
        assert "gradients non-finite in" in message
        assert "the weights themselves are non-finite (model.blocks.1.terms.0.field.q.weight" in message
        assert not list(tmp_path.glob("*.ckpt"))
    else:
        # Scores of ~1e60 overflow inside block 1's attention at t = 1; the solver stops the forward
        # pass after its step 2, and the guard names the module (its output projection, which only
        # passes the NaN on, is not blamed).
        assert "training step 2 turned non-finite in the forward pass: the state became non-finite at step 2" in message
        assert ("first module to turn finite inputs non-finite: model.blocks.1.terms.0.field (AttentionField) at t=1; "
                "its output: shape (8, 15, 16), ") in message
        assert "first non-finite state: after solver step 2 of 2 (t=2): shape (8, 15, 16)" in message
        saved = load_checkpoint(tmp_path / "nonfinite-step2.ckpt")
        assert saved["global_step"] == 2 and all(torch.isfinite(t).all() for t in weights(saved))


def test_training_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    common = ["fit", *TINY, "--model.max_steps=30", "--trainer.max_steps=30", "--trainer.val_check_interval=30",
              checkpoints_every(3, tmp_path / "ck")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "svflow_ode.training.cli", *common], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "ck" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.kill()  # SIGKILL: no handler, no clean-up, possibly mid-write
    _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{err.decode()[-2000:]}"
    killed_at = load_checkpoint(last)["global_step"]
    assert 3 <= killed_at < 30
    resumed = run([*common, "--ckpt_path=last"])
    whole = run([*common[:-1], checkpoints_every(3, tmp_path / "whole")])
    assert resumed.trainer.global_step == whole.trainer.global_step == 30
    assert resumed.trainer.callback_metrics["val/loss"].item() == pytest.approx(
        whole.trainer.callback_metrics["val/loss"].item(), rel=1e-6)
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, last)

    def save_then_die(obj, f):
        f.write(b"PK" + bytes(1000))  # the start of a zip archive, then the process is gone
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(torch, "save", save_then_die)
    pid = os.fork()  # a child process writes the next checkpoint and is killed midway
    if pid == 0:
        try:
            AtomicCheckpointIO().save_checkpoint({"step": 2}, last)
        finally:
            os._exit(1)  # never back into pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    [partial] = tmp_path.glob(".last.ckpt.*.tmp")  # the kill did land mid-write
    assert partial.stat().st_size == 1002
    previous = AtomicCheckpointIO().load_checkpoint(last)
    assert previous["step"] == 1 and torch.equal(previous["w"], torch.ones(3))


def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_debris(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, last)

    def disk_full(obj, f):
        f.write(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, last)
    assert load_checkpoint(last) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_under_a_grad_scaler_the_guard_leaves_overflowing_gradients_to_it():
    # fp16 mixed precision: GradScaler skips an overflowing step and lowers its scale by design.
    module = torch.nn.Linear(2, 2)
    module.weight.grad = torch.full((2, 2), float("inf"))
    guard = FiniteGuard()
    guard._report = lambda trainer, pl_module, loss: "non-finite"  # the report itself is tested above
    guard.on_before_backward(None, module, torch.tensor(1.0))
    strategy = SimpleNamespace(reduce_boolean_decision=lambda bad, all: bad)
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), strategy=strategy)
    guard.on_before_optimizer_step(scaled, module, None)  # no error
    guard.on_before_backward(None, module, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteTrainingError, match="non-finite"):  # the loss is still checked
        guard.on_before_optimizer_step(scaled, module, None)
    unscaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None), strategy=strategy)
    guard.on_before_backward(None, module, torch.tensor(1.0))
    with pytest.raises(NonFiniteTrainingError):  # without a scaler the gradients are checked
        guard.on_before_optimizer_step(unscaled, module, None)


def test_checkpoints_are_written_with_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_a_strategy_object_keeps_its_own_checkpoint_io(tmp_path):
    strategy = {"class_path": "lightning.pytorch.strategies.SingleDeviceStrategy",
                "init_args": {"device": "cpu", "checkpoint_io": {
                    "class_path": "lightning.pytorch.plugins.io.TorchCheckpointIO"}}}
    cli = run(["fit", *TINY, "--trainer.callbacks=[]", "--trainer.fast_dev_run=true",
               f"--trainer.strategy={json.dumps(strategy)}"])
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


class Payload:
    """Unpickling this runs a shell command that creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_holds_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "hyper_parameters": {"lr": Payload(marker)}}, evil)
    reason = "GLOBAL posix.system"
    with pytest.raises(SystemExit) as exit_info:  # svflow-ode fit --ckpt_path
        run(["fit", *TINY, f"--ckpt_path={evil}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"configuration error: refused to load {evil}" in err and reason in err
    for load in (sample, AtomicCheckpointIO().load_checkpoint):  # svflow-ode-sample; --ckpt_path last
        with pytest.raises(UntrustedCheckpointError, match=reason):
            load(str(evil))
    with pytest.raises(pickle.UnpicklingError, match=reason):  # Lightning loads with torch's weights_only=True
        LitSVFlow.load_from_checkpoint(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: trusting the file would have run it
    assert marker.exists()


def test_a_checkpoint_of_another_shape_names_the_settings_that_differ(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20)
    char = ["--data=CharDataModule", f"--data.path={corpus}", "--trainer.max_steps=1", checkpoints_every(1, "ck")]
    run(["fit", *TINY, *char, "--data.context=16"])
    with pytest.raises(ValueError) as info:
        run(["fit", *TINY, *char, "--data.context=24", "--trainer.max_steps=2", "--ckpt_path=ck/last.ckpt"])
    message = str(info.value)
    assert "configuration entries differ: model.init_args.context: 16 (checkpoint) vs 24 (here)" in message
    assert "model.embed.position.weight: (16, 16) in the checkpoint, (24, 16) here" in message
    assert "size mismatch" not in message
