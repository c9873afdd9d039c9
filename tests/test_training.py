"""Training through the ``svflow-ode`` command line: every solver, exact resume, logging, errors."""

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from svflow_ode.lm import SVFlowLM
from svflow_ode.training import LitSVFlow, LMDataModule
from svflow_ode.training.cli import run
from svflow_ode.training.sample import sample

BASE = str(Path(__file__).parents[1] / "experiments" / "configs" / "base.yaml")
TINY = [
    f"--config={BASE}", "--model.model.init_args.d_model=16", "--model.model.init_args.n_heads=2",
    "--data.n_pairs=4", "--data.n_queries=4", "--data.batch_size=8", "--data.val_size=16",
    "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
]
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rkmk2": 2, "rkmk4": 4}


@pytest.fixture(autouse=True)
def _command_line(monkeypatch, tmp_path):
    # The CLI runs in-process with explicit args; pytest's own arguments are not for it. Anything
    # a run writes to a relative path lands in the test's folder.
    monkeypatch.setattr(sys, "argv", ["svflow-ode"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second intra-op thread gains nothing and stalls on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UncheckedData(LMDataModule):
    """A data module that divides by its argument unchecked (for the CLI's last line of defence)."""

    def __init__(self, divisor: int = 0):
        super().__init__(batch_size=8, seed=0, val_size=8, test_size=8)
        self.vocab_size, self.context = 8, 16 // divisor


def csv_logger(save_dir, name="run"):
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(save_dir), "name": name}}
    return f"--trainer.logger={json.dumps([logger])}"


def checkpointing(every: int):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": every}}]
    return f"--trainer.callbacks={json.dumps(callbacks)}"


def train_losses(log_dir) -> dict[int, float]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_fast_dev_run_every_solver(method):
    norm = "sphere" if method.startswith("rkmk") else "post_ln"  # Lie-group steps need an SO(n) action
    cli = run(["fit", *TINY, f"--model.model.init_args.method={method}", f"--model.model.init_args.norm={norm}",
               "--trainer.fast_dev_run=true"])
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    # Two fields (attention, FFN) per layer, each evaluated once per stage.
    assert metrics["val/nfe"] == STAGES[method] * 2 * 2


def test_fast_dev_run_on_the_dyck_task():
    dyck = str(Path(BASE).with_name("dyck.yaml"))
    cli = run(["fit", *TINY, f"--config={dyck}", "--data.context=16", "--trainer.fast_dev_run=true"])
    assert cli.model.model.vocab_size == 6 and cli.model.model.context == 16  # linked from the data
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_resume_gives_identical_losses(tmp_path):
    common = ["fit", *TINY, "--model.max_steps=8", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=4",
              checkpointing(4)]
    whole = run([*common, "--trainer.max_steps=8", csv_logger(tmp_path, "whole")])
    first = run([*common, "--trainer.max_steps=4", csv_logger(tmp_path, "parts")])
    ckpt = Path(first.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    second = run([*common, "--trainer.max_steps=8", csv_logger(tmp_path, "parts"), f"--ckpt_path={ckpt}"])
    expected = train_losses(whole.trainer.logger.log_dir)
    resumed = {**train_losses(first.trainer.logger.log_dir), **train_losses(second.trainer.logger.log_dir)}
    assert sorted(expected) == sorted(resumed) == list(range(8))
    assert resumed == expected  # bit for bit
    assert len(set(expected.values())) == 8  # the steps did train


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    module = LitSVFlow(torch.nn.Linear(1, 1), lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=20)
    factors = [module.lr_factor(step) for step in range(30)]
    assert factors[0] == pytest.approx(1 / 5) and factors[3] == pytest.approx(4 / 5)
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20] == factors[29] == pytest.approx(0.1)


@pytest.mark.parametrize("settings, message", [
    ({"lr": math.nan}, "need finite values, got lr=nan"),
    ({"weight_decay": math.inf}, "need finite values, got weight_decay=inf"),
    ({"consistency_beta": math.nan}, "need finite values, got consistency_beta=nan"),
    ({"betas": (0.9, math.nan)}, "need finite values, got beta2=nan"),
    ({"lr": 0.0, "min_lr": 0.0}, "need 0 <= min_lr <= lr and lr > 0"),
])
def test_optimizer_settings_that_every_comparison_lets_through_are_refused(settings, message):
    # NaN compares false with everything: each used to be accepted, and to show only as a NaN loss
    # (lr = 0: a division by zero in the schedule).
    with pytest.raises(ValueError, match=re.escape(message)):
        LitSVFlow(torch.nn.Linear(1, 1), **settings)


@pytest.mark.parametrize("init", ["nanogpt", "fan_in"])
def test_init_scales_linear_weights_by_fan_in_and_keeps_embeddings(init):
    model = SVFlowLM(vocab_size=100, d_model=64, n_heads=4, n_blocks=2, context=8, init=init)
    attention, ffn = (term.field for term in model.blocks[0].terms)
    fan_in = init == "fan_in"
    assert attention.q.weight.std().item() == pytest.approx(64**-0.5 if fan_in else 0.02, rel=0.1)
    assert ffn.down.weight.std().item() == pytest.approx(256**-0.5 if fan_in else 0.02, rel=0.1)  # fan-in 4 * 64
    assert not attention.q.bias.any()
    assert model.head.weight is model.embed.word.weight
    assert model.embed.word.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        SVFlowLM(vocab_size=10, d_model=16, n_heads=2, init="xavier")


def test_wandb_runs_offline_without_network(tmp_path, monkeypatch):
    # Any attempt to reach a server would fail on this address.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(tmp_path), "project": "test", "offline": True}}
    run(["fit", *TINY, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
         f"--trainer.logger={json.dumps([logger])}"])
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.model.init_args.method=rk5", "unknown method 'rk5'; known methods: euler"),
        ("--model.model.init_args.steps=0", "steps must be a positive integer"),
        ("--model.model.init_args.steps=-2", "steps must be a positive integer"),
        ("--model.model.init_args.steps=3", "must be a multiple of the number of blocks (2)"),
        ("--data=CharDataModule --data.path=/no/such/corpus.txt", "data file not found: /no/such/corpus.txt"),
        ("--trainer.max_steps=0", "trainer.max_steps=0 trains nothing: give a positive number of optimizer steps"),
        ("--trainer.max_steps=-1", "trainer.max_steps=-1 (no limit) leaves the learning-rate schedule without a "
                                   "length: give a positive trainer.max_steps, or model.max_steps"),
        (f"--config={Path(BASE).with_name('dyck.yaml')} --data.context=0", "context >= 1, got 3, 8, 0.5, 0"),
        ("--trainer.val_check_interval=0", "trainer.val_check_interval must be a positive number of steps"),
        ("--trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be >= 1, got 0"),
        ("--data.seed=-1", "seed must be >= 0, got -1"),
        ("--model.betas=[0.9,1.5]", "need two betas in [0, 1) and weight_decay >= 0, got betas=(0.9, 1.5)"),
        ("--model.model.init_args.n_heads=0", "n_heads must be a positive integer, got 0"),
        # A value that a class does not check itself, failing deeper: still one line, naming where.
        ("--data=test_training.UncheckedData", "ZeroDivisionError: integer division or modulo by zero "
                                              "(test_training.py:"),
    ],
)
def test_config_errors_stop_before_anything_is_written(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *TINY, *override.split(), csv_logger(tmp_path), f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line]  # one line
    assert line.startswith("svflow-ode: error: configuration error: ") and message in line
    assert not any(tmp_path.iterdir())  # no run directory either


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--help"])
    text = capsys.readouterr().out
    for phrase in ["peak learning rate", "length of the schedule",
                   "data.vocab_size --> model.model.init_args.vocab_size"]:
        assert phrase in " ".join(text.split())


def test_sample_after_training_on_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20)
    cli = run(["fit", *TINY, "--data=CharDataModule", f"--data.path={corpus}", "--data.context=16",
               "--trainer.max_steps=2", "--trainer.val_check_interval=2", checkpointing(2), csv_logger(tmp_path)])
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    text = sample(str(ckpt), prompt="to be", num_chars=40, seed=1)
    assert text.startswith("to be") and len(text) == 45 and set(text) <= set(corpus.read_text())
    assert text == sample(str(ckpt), prompt="to be", num_chars=40, seed=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(str(ckpt), prompt="XYZ")
