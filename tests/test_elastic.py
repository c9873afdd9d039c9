"""Elastic depth: training at random step counts, LayerDrop, pruning, and the depth curve of a checkpoint."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from svflow_ode.flops import forward_flops_per_token
from svflow_ode.lm import SVFlowLM
from svflow_ode.training import LitSVFlow
from svflow_ode.training.cli import run
from svflow_ode.training.data import seeded_generator
from svflow_ode.training.depth import depth_curve, depth_options
from svflow_ode.training.module import token_metrics

pytestmark = pytest.mark.usefixtures("cli_in_tmp")

V, D, HEADS, FF, CTX = 12, 16, 2, 32, 6
# Per token (as tests/test_flops.py counts): attention 3*2*16*16 + 2*2*6*16 + 2*16*16 = 2432,
# FFN 2*16*32 * 2 = 2048, head 2*16*12 = 384.
ATTENTION, FFN, HEAD = 2432, 2048, 384

BASE = str(Path(__file__).parents[1] / "experiments" / "configs" / "base.yaml")
TINY = [
    f"--config={BASE}", "--model.model.init_args.d_model=16", "--model.model.init_args.n_heads=2",
    "--data.n_pairs=4", "--data.n_queries=4", "--data.batch_size=8", "--data.val_size=20",
    "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
]


def lm(**kw) -> SVFlowLM:
    return SVFlowLM(**{"vocab_size": V, "d_model": D, "n_heads": HEADS, "n_blocks": 4, "d_ff": FF, "context": CTX, **kw})


def ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (batch, CTX))


def without_skipped(model: SVFlowLM, layers: list[int], **kw) -> SVFlowLM:
    """A model built with only ``layers`` of ``model``'s blocks, every weight copied from it."""
    shallow = lm(**{**kw, "n_blocks": len(layers)})
    renamed = {f"blocks.{j}.": f"blocks.{i}." for i, j in enumerate(layers)}
    state = {}
    for key, value in model.state_dict().items():
        block = ".".join(key.split(".")[:2]) + "."
        if key.startswith("blocks."):
            if block not in renamed:
                continue
            key = renamed[block] + key[len(block):]
        state[key] = value
    shallow.load_state_dict(state)  # strict: every tensor of the shallow model comes from the deep one
    return shallow.train(model.training)


def fit(tmp_path, name: str, *args: str):
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": name}}
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}}]
    return run(["fit", *TINY, f"--trainer.logger={json.dumps([logger])}", f"--trainer.callbacks={json.dumps(callbacks)}",
                *args])


def logged(cli, column: str) -> dict[int, float]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def last_checkpoint(cli) -> Path:
    return Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"


def evaluate(model, datamodule, **forward) -> float:
    """The validation loss of ``model`` by hand: per-batch losses, weighted by batch size."""
    total = count = 0
    with torch.no_grad():
        for input_ids, labels in datamodule.val_dataloader():
            total += len(input_ids) * token_metrics(model(input_ids, **forward).logits, labels)[0].item()
            count += len(input_ids)
    return total / count


# Random step counts in training.

def test_drawn_step_counts_depend_only_on_seed_and_step_and_cover_the_range():
    def draws(seed):
        module = LitSVFlow(lm(time="continuous"), train_steps=(1, 8), seed=seed)
        return [module.training_options(step)["steps"] for step in range(300)]

    first = draws(0)
    assert draws(0) == first  # another module, the same sequence
    assert draws(1) != first
    assert set(first) == set(range(1, 9))
    module = LitSVFlow(lm(time="shared"), train_steps=[3, 3])
    assert module.training_options(5) == {"steps": 3}
    assert LitSVFlow(lm(time="continuous")).training_options(5) == {}  # off: the model's own steps


def test_training_at_random_step_counts_varies_nfe_and_resumes_exactly(tmp_path):
    args = ["--model.model.init_args.time=continuous", "--model.train_steps=[1,4]", "--model.seed=5",
            "--model.max_steps=4", "--trainer.val_check_interval=2"]
    whole = fit(tmp_path, "whole", *args, "--trainer.max_steps=4")
    first = fit(tmp_path, "parts", *args, "--trainer.max_steps=2")
    second = fit(tmp_path, "parts", *args, "--trainer.max_steps=4", f"--ckpt_path={last_checkpoint(first)}")
    drawn = [whole.model.training_options(step)["steps"] for step in range(4)]
    nfe = logged(whole, "train/nfe")
    assert nfe == {step: 2 * k for step, k in enumerate(drawn)}  # two fields per step
    assert len(set(nfe.values())) > 1
    assert set(logged(whole, "val/nfe").values()) == {4.0}  # validation: the model's own 2 steps
    for column in ("train/loss", "train/nfe"):
        assert {**logged(first, column), **logged(second, column)} == logged(whole, column)  # bit for bit


# LayerDrop and pruning.

def test_layerdrop_off_is_the_plain_model():
    model, x = lm(), ids()
    dropping = lm(layerdrop=0.5)
    dropping.load_state_dict(model.state_dict())
    rng = torch.get_rng_state()
    plain = model(x)
    assert torch.equal(torch.get_rng_state(), rng)  # p = 0 draws nothing: the global stream is untouched
    assert torch.equal(dropping.eval()(x).logits, plain.logits)  # evaluation runs every block
    assert torch.equal(model(x, layers=[0, 1, 2, 3]).logits, plain.logits)
    assert plain.stats.nfe == dropping(x).stats.nfe == 8
    assert LitSVFlow(model).training_options(0) == {}  # trained with exactly the forward pass as before


def test_layerdrop_skips_blocks_as_exact_identity_steps():
    model, x = lm(layerdrop=0.5), ids()
    seeds = {tuple(model.drawn_layers(torch.Generator().manual_seed(s))): s for s in range(200)}
    gapped = next(s for kept, s in seeds.items() if 1 < len(kept) < 4 and kept[-1] - kept[0] >= len(kept))
    kept = model.drawn_layers(torch.Generator().manual_seed(gapped))
    out = model(x, generator=torch.Generator().manual_seed(gapped))
    ref = without_skipped(model, kept)(x)
    assert out.stats.nfe == 2 * len(kept) and len(out.hidden_states) == len(kept) + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(out.logits, ref.logits)
    out.logits.square().mean().backward()
    for k, block in enumerate(model.blocks):  # a skipped block is not in the graph at all
        assert all((p.grad is not None) == (k in kept) for p in block.parameters())
    # Every block skipped (p^4 = 1/16 of the draws): the readout sees the embedding, at no cost.
    none = seeds[()]
    out = model(x, generator=torch.Generator().manual_seed(none))
    assert out.stats.nfe == 0 and torch.equal(out.logits, model.head(model.embed(x)))


def test_layerdrop_drops_each_block_at_its_rate():
    model = lm(n_blocks=8, layerdrop=0.25)
    generator = torch.Generator().manual_seed(0)
    kept = sum(len(model.drawn_layers(generator)) for _ in range(500))
    assert kept / (500 * 8) == pytest.approx(0.75, abs=0.03)  # 4,000 draws: sd 0.007


@pytest.mark.parametrize("depth, layers", [(1, [0]), (3, [0, 2, 5]), (4, [0, 2, 4, 6]), (8, list(range(8)))])
def test_pruning_keeps_layers_evenly(depth, layers):
    assert lm(n_blocks=8).pruned_layers(depth) == layers


@pytest.mark.parametrize("kw", [
    {},  # a post-LN Transformer
    {"steps": 8},  # two Euler steps per layer: pruned, two per kept layer
    {"norm": "pre_ln", "method": "rk4"},
    {"norm": "pre_ln", "splitting": "none", "method": "dopri5"},  # adaptive: restarts at each kept layer
])
def test_pruned_evaluation_equals_a_shallower_model_with_the_weights_copied(kw):
    model, x = lm(**kw).eval(), ids()
    layers = model.pruned_layers(2)
    shallow = without_skipped(model, layers, **{**kw, "steps": kw.get("steps", 4) // 2})
    out, ref = model(x, layers=layers), shallow(x)
    assert torch.equal(out.logits, ref.logits) and out.stats.nfe == ref.stats.nfe
    # FLOPs follow the pass that ran: the shallow model's.
    assert forward_flops_per_token(model, out.stats.nfe, CTX) == forward_flops_per_token(shallow, ref.stats.nfe, CTX)


def test_flops_of_pruned_and_elastic_passes():
    x = ids()
    per_step = lm()
    for depth in range(5):
        nfe = per_step(x, layers=per_step.pruned_layers(depth)).stats.nfe
        assert forward_flops_per_token(per_step, nfe, CTX) == depth * (ATTENTION + FFN) + HEAD
    continuous = lm(time="continuous", method="heun")
    for steps in (1, 3, 8):
        nfe = continuous(x, steps=steps).stats.nfe
        assert forward_flops_per_token(continuous, nfe, CTX) == 2 * steps * (ATTENTION + FFN) + HEAD


# Refusals: one line each.

@pytest.mark.parametrize("build, message", [
    (lambda: LitSVFlow(lm(), train_steps=(1, 4)),
     "train_steps draws a step count per batch, which needs an SVFlow whose step count is free (time='continuous' "
     "or 'shared'), not time='per_step'; per-step models train for pruning with layerdrop"),
    (lambda: LitSVFlow(lm(time="continuous", splitting="none", method="dopri5"), train_steps=(1, 4)),
     "train_steps draws fixed step counts, but the model's method 'dopri5' is adaptive"),
    (lambda: LitSVFlow(lm(time="continuous"), train_steps=(4, 1)), "train_steps must be [min, max] step counts"),
    (lambda: LitSVFlow(lm(time="continuous"), train_steps=(0, 4)), "with 1 <= min <= max, got (0, 4)"),
    (lambda: LitSVFlow(lm(time="continuous"), train_steps=[1, 2, 3]), "got [1, 2, 3]"),
    (lambda: LitSVFlow(lm(time="continuous"), train_steps=8), "got 8"),
    (lambda: LitSVFlow(lm(), seed=-1), "seed must be an integer >= 0, got -1"),
    (lambda: lm(time="continuous", layerdrop=0.1), "layerdrop skips whole layers of a per-step model, but this "
                                                   "model has time='continuous'"),
    (lambda: lm(layerdrop=1.0), "layerdrop must be a probability in [0, 1), got 1.0"),
    (lambda: lm(layerdrop=math.nan), "layerdrop must be a probability in [0, 1), got nan"),
    (lambda: lm()(ids(), layers=[2, 1]), "layers must be increasing block indices in 0..3, got [2, 1]"),
    (lambda: lm()(ids(), layers=[1, 1]), "got [1, 1]"),
    (lambda: lm()(ids(), layers=[4]), "got [4]"),
    (lambda: lm()(ids(), layers=[0, 2], steps=3), "steps (3) must be a multiple of the number of blocks (2)"),
    (lambda: lm(time="continuous")(ids(), layers=[0]), "layers= prunes a per-step model; this one has "
                                                       "time='continuous': run it at another depth with steps="),
    (lambda: lm().pruned_layers(5), "a model of 4 layers prunes to a depth in 0..4, got 5"),
    (lambda: depth_options(lm(time="continuous", splitting="none", method="dopri5"), 2),
     "the model's method 'dopri5' is adaptive: it chooses its own steps, so it has no depth to set"),
    (lambda: depth_options(lm(time="continuous"), 0), "a depth is a positive number of steps, got 0"),
])
def test_refusals_are_one_line(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("--model.train_steps=[1,4]", "train_steps draws a step count per batch"),
    ("--model.model.init_args.time=continuous --model.model.init_args.layerdrop=0.2", "layerdrop skips whole layers"),
])
def test_the_command_line_refuses_them_before_training(capsys, override, message):
    with pytest.raises(SystemExit) as info:
        run(["fit", *TINY, *override.split(), "--trainer.logger=false"])
    assert info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert message in line


# One checkpoint at many depths.

def test_depth_curve_of_an_elastic_model(tmp_path):
    cli = fit(tmp_path, "elastic", "--model.model.init_args.time=continuous", "--model.train_steps=[1,4]",
              "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    curve = depth_curve(last_checkpoint(cli), cli.datamodule, depths=[1, 2, 3, 4], progress=False)
    model = cli.model.model.eval()
    assert [row["depth"] for row in curve] == [row["steps"] for row in curve] == [1, 2, 3, 4]
    assert [row["nfe"] for row in curve] == [2, 4, 6, 8] and all(row["layers"] is None for row in curve)
    flops = [row["forward_flops_per_token"] for row in curve]
    assert flops == [forward_flops_per_token(model, 2 * k, cli.datamodule.context) for k in (1, 2, 3, 4)]
    assert all(a < b for a, b in zip(flops, flops[1:]))  # fewer steps, fewer FLOPs
    # At its own depth (2 steps), the loss Lightning logged at the end of training.
    assert curve[1]["loss"] == pytest.approx(cli.trainer.callback_metrics["val/loss"].item(), rel=1e-6)
    assert curve[1]["acc"] == pytest.approx(cli.trainer.callback_metrics["val/acc"].item(), rel=1e-6)
    for row in curve:
        assert row["loss"] == pytest.approx(evaluate(model, cli.datamodule, steps=row["depth"]), rel=1e-6)
        assert row["bpc"] == pytest.approx(row["loss"] / math.log(2))
    assert len({row["loss"] for row in curve}) == 4


def test_layerdrop_training_and_the_depth_curve_of_the_pruned_model(tmp_path):
    cli = fit(tmp_path, "layerdrop", "--model.model.init_args.n_blocks=4", "--model.model.init_args.layerdrop=0.5",
              "--model.seed=2", "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    model = cli.model.model.eval()
    # Each training step ran the blocks LayerDrop kept under the (seed, step) generator; validation all.
    drawn = [len(model.drawn_layers(seeded_generator(2, step))) for step in range(4)]
    assert logged(cli, "train/nfe") == {step: 2 * k for step, k in enumerate(drawn)}
    assert len(set(drawn)) > 1 and set(logged(cli, "val/nfe").values()) == {8.0}
    curve = depth_curve(last_checkpoint(cli), cli.datamodule, depths=range(1, 5), progress=False)
    assert [row["layers"] for row in curve] == [[0], [0, 2], [0, 1, 2], [0, 1, 2, 3]]
    assert [row["nfe"] for row in curve] == [2, 4, 6, 8]
    flops = [row["forward_flops_per_token"] for row in curve]
    assert all(a < b for a, b in zip(flops, flops[1:]))
    assert curve[3]["loss"] == pytest.approx(cli.trainer.callback_metrics["val/loss"].item(), rel=1e-6)
    shallow = without_skipped(model, [0, 2], **{**cli.model.hparams["model"]["init_args"], "layerdrop": 0.0})
    assert curve[1]["loss"] == pytest.approx(evaluate(shallow, cli.datamodule), rel=1e-6)
    with pytest.raises(ValueError, match="a model of 4 layers prunes to a depth in 0..4, got 5"):
        depth_curve(last_checkpoint(cli), cli.datamodule, depths=[1, 5], progress=False)
