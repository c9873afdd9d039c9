"""Bad input at the command lines: one line on stderr, exit status 2, nothing written, nothing run.

Unusable checkpoint files, configuration values and sampling options, and a fuzz of
``svflow-ode fit``'s option values.
"""

import functools
import json
import os
import random
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svflow_ode.training import sample as sample_module
from svflow_ode.training.checkpoints import CheckpointError, UntrustedCheckpointError
from svflow_ode.training.cli import run
from svflow_ode.training.sample import sample

ROOT = Path(__file__).parents[1]
BASE = str(ROOT / "experiments" / "configs" / "base.yaml")
# The shipped configuration (its CSV logger writes under runs/), smaller; no run gets as far as
# starting W&B.
SHIPPED = [f"--config={BASE}", "--model.model.init_args.d_model=16", "--model.model.init_args.n_heads=2",
           "--data.batch_size=8", "--data.val_size=16", "--trainer.enable_model_summary=false",
           "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]
TEXT = "to be or not to be, that is the question\n" * 20


@pytest.fixture(autouse=True)
def _in_tmp_with_one_thread(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["svflow-ode"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SVFLOW_ODE_TRACEBACK", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def refused(command, capsys) -> str:
    """Run ``command`` (a callable); it must exit with status 2 and one error line, no traceback: that line."""
    with pytest.raises(SystemExit) as exit_info:
        command()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a character model trained one step on ``TEXT``."""
    folder = tmp_path_factory.mktemp("char")
    (folder / "corpus.txt").write_text(TEXT)
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(folder / "ck"), "save_last": True}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["svflow-ode"])
        patch.chdir(folder)
        run(["fit", *SHIPPED, "--trainer.logger=false", "--data=CharDataModule", f"--data.path={folder / 'corpus.txt'}",
             "--data.context=16", "--trainer.max_steps=1", f"--trainer.callbacks={json.dumps([callback])}"])
    return folder / "ck" / "last.ckpt"


class Payload:
    """Unpickling this runs a shell command that creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_bad_checkpoint(kind: str, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "cut short":  # a checkpoint whose copy or write stopped half-way
        torch.save({"state_dict": {"w": torch.randn(64, 64)}, "pytorch-lightning_version": "2.6"}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("epoch 3: loss 1.25\n")
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "not Lightning's":
        torch.save({"weights": torch.ones(3)}, path)
    elif kind == "code":
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": Payload(path.with_name("pwned"))}}, path)


BAD_CHECKPOINTS = {
    "empty": "is not a readable checkpoint: the file is empty (0 bytes)",
    "cut short": "is not a readable checkpoint: a zip archive cut short (",
    "text": "is not a readable checkpoint: a text file (19 bytes, beginning 'epoch 3: loss 1.25\\n'), not a checkpoint",
    # Not "holds Python objects that could run code": these bytes are no pickle at all.
    "random bytes": "is not a readable checkpoint: neither a zip archive nor a pickle that torch.save writes "
                    "(4096 bytes",
    "not Lightning's": "is a PyTorch file but no Lightning checkpoint: it lacks 'state_dict' and "
                       "'pytorch-lightning_version' (it holds keys weights)",
    "code": "it holds Python objects other than tensors and plain containers (Trying to load unsupported "
            "GLOBAL posix.system",
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_an_unusable_checkpoint_file_is_named_for_what_it_is(tmp_path, capsys, kind):
    bad = tmp_path / "bad.ckpt"
    write_bad_checkpoint(kind, bad)
    expected = BAD_CHECKPOINTS[kind]
    line = refused(lambda: run(["fit", *SHIPPED, "--trainer.max_steps=2", f"--ckpt_path={bad}"]), capsys)
    assert line.startswith("svflow-ode: error: configuration error: ") and expected in line
    line = refused(lambda: sample_module.main([str(bad)]), capsys)
    assert line.startswith("svflow-ode-sample: error: ") and expected in line
    error = UntrustedCheckpointError if kind == "code" else CheckpointError
    with pytest.raises(error, match="^(refused to load )?" + str(bad)):
        sample(str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]  # no run directory; the payload never ran


def test_a_latin1_data_file_keeps_its_iconv_hint_through_the_cli(tmp_path, capsys):
    # _read_text raises its ValueError `from None`; the CLI's search for the root cause must stop
    # there, not walk on to the UnicodeDecodeError it replaced.
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("café au lait\n".encode("latin-1") * 40)
    line = refused(lambda: run(["fit", *SHIPPED, "--data=CharDataModule", f"--data.path={corpus}"]), capsys)
    assert line == (f"svflow-ode: error: configuration error: {corpus} is not UTF-8 text: byte 0xe9 at offset 3 "
                    f"(invalid continuation byte); convert it first, e.g. iconv -f latin1 -t utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]


@pytest.mark.parametrize("options, message", [
    (["--top_k=0"], "top_k must be >= 1 (or None: all characters), got 0"),
    (["--top_k=-3"], "top_k must be >= 1 (or None: all characters), got -3"),
    (["--num_chars=-5"], "num_chars must be >= 0, got -5"),
    (["--temperature=0"], "temperature must be positive and finite, got 0.0"),
    (["--prompt=XYZ to be"],
     "the prompt has 3 characters outside the vocabulary (15 characters, the training text's): 'XYZ'"),
    (["--top_k=many"], 'Parser key "top_k": '),
    (["--no_such_option=1"], "unrecognized arguments: --no_such_option=1"),
])
def test_sample_refuses_bad_options_in_one_line(char_checkpoint, capsys, options, message):
    line = refused(lambda: sample_module.main([str(char_checkpoint), *options]), capsys)
    assert line.startswith("svflow-ode-sample: error: ") and message in line


def test_sample_with_good_options_prints_the_text(char_checkpoint, capsys):
    sample_module.main([str(char_checkpoint), "--prompt=to be", "--num_chars=5", "--top_k=3"])
    out = capsys.readouterr().out
    assert out.startswith("to be") and len(out) == len("to be") + 5 + 1


# The fuzz: option values that no option of its kind takes, and option names that do not exist.
POSITIVE_INT = ["trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.val_check_interval",
                "model.max_steps", "model.model.init_args.d_model", "model.model.init_args.n_blocks",
                "data.batch_size", "data.val_size", "data.n_pairs", "data.n_queries", "data.n_keys", "data.n_values"]
NON_NEGATIVE_INT = ["model.warmup_steps", "data.seed", "seed_everything"]
POSITIVE_FLOAT = ["model.lr"]
NON_NEGATIVE_FLOAT = ["model.min_lr", "model.weight_decay", "model.consistency_beta", "trainer.gradient_clip_val"]
WRONG_TYPE = st.sampled_from(["abc", "[1, 2]", "one", "1.5.2", "''"])
NEGATIVE = st.integers(max_value=-1).map(str)
NOT_A_NUMBER = st.sampled_from(["nan", "inf", "-inf"])


def bad_value(option: str):
    if option in POSITIVE_INT:
        return st.one_of(st.just("0"), NEGATIVE, NOT_A_NUMBER, st.just("1.5"), WRONG_TYPE)
    if option in NON_NEGATIVE_INT:
        return st.one_of(NEGATIVE, NOT_A_NUMBER, st.just("2.5"), WRONG_TYPE)
    if option in POSITIVE_FLOAT:
        return st.one_of(st.just("0"), NEGATIVE, NOT_A_NUMBER, WRONG_TYPE)
    return st.one_of(NEGATIVE, st.floats(max_value=-1e-6).map(repr), NOT_A_NUMBER, WRONG_TYPE)


ARGUMENTS = st.one_of(
    st.sampled_from(POSITIVE_INT + NON_NEGATIVE_INT + POSITIVE_FLOAT + NON_NEGATIVE_FLOAT).flatmap(
        lambda option: bad_value(option).map(lambda value: f"--{option}={value}")),
    st.tuples(st.sampled_from(["trainer.", "model.", "model.model.init_args.", "data.", ""]),
              st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True), st.sampled_from(["1", "0", "-1", "nan", "abc"]))
    .map(lambda parts: f"--{parts[0]}{parts[1]}_zz={parts[2]}"),  # no option ends in _zz
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argument=ARGUMENTS)
def test_fuzz_bad_option_values_and_names_give_one_line_and_exit_2(tmp_path, capsys, argument):
    # Training is replaced by a failure: a value the CLI let through fails the test, and costs nothing.
    # (functools.wraps keeps fit's signature, from which LightningCLI builds the fit subcommand.)
    @functools.wraps(L.Trainer.fit)
    def fit(*args, **kwargs):
        raise AssertionError(f"svflow-ode fit accepted {argument}")

    with mock.patch.object(L.Trainer, "fit", fit):
        line = refused(lambda: run(["fit", *SHIPPED, "--trainer.max_steps=3", argument]), capsys)
    assert line.startswith(("svflow-ode: error: ", "svflow-ode fit: error: "))
    assert not (tmp_path / "runs").exists()  # no run directory is left behind
