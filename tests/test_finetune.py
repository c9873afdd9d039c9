"""Fine-tuning converted models (``svflow_ode.training.finetune``): the objectives by hand, the
``svflow-ode-finetune`` command on MiniLM, and a randomly initialised GPT-2 taken end to end:
BPE data, conversion, Heun fine-tune, exact resume, sampling."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from experiments import sweep
from svflow_ode.flops import forward_flops_per_token, training_flops_per_token
from svflow_ode.pretrained import from_pretrained, student
from svflow_ode.training.data import CORPORA
from svflow_ode.training.finetune import LitFineTune, run, teacher_path
from svflow_ode.training.prepare import prepare
from svflow_ode.training import sample as sample_module


ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "minilm_finetune.yaml")
GRID = ROOT / "experiments" / "grids" / "minilm_compression.yaml"
MINILM = "all-MiniLM-L6-v2"
LINE = "to be or not to be, that is the question\n"
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")  # model_step without a Trainer


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory) -> Path:
    """20 kB of Tiny Shakespeare in MiniLM's tokens."""
    tmp = tmp_path_factory.mktemp("minilm")
    (tmp / "text.txt").write_text(CORPORA["tinyshakespeare"].read_text()[:20_000])
    prepare([str(tmp / "text.txt")], str(tmp / "data"), tokenizer=teacher_path(MINILM), progress=False)
    return tmp / "data"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, Path]:
    """``(checkpoint directory, data)``: a random 4-layer GPT-2 with the vocabulary of a BPE of one repeated line."""
    tmp = tmp_path_factory.mktemp("gpt2")
    (tmp / "text.txt").write_text(LINE * 200)
    meta = prepare([str(tmp / "text.txt")], str(tmp / "data"), bpe=300, progress=False)
    config = transformers.GPT2Config(vocab_size=meta["vocab_size"], n_positions=32, n_embd=32, n_layer=4, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2")
    return tmp / "gpt2", tmp / "data"


def callbacks_and_logger(save_dir: Path) -> list[str]:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}]
    return [f"--trainer.callbacks={json.dumps(callbacks)}", f"--trainer.logger={json.dumps(loggers)}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def tiny_minilm(data: Path, tmp: Path) -> list[str]:
    """The shipped config on a small data set: batches of 2 windows of 16 tokens."""
    return [f"--config={CONFIG}", f"--data.path={data}", "--data.context=16", "--data.batch_size=2",
            "--data.val_size=4", "--trainer.val_check_interval=2", *callbacks_and_logger(tmp)]


def refused(call, capsys) -> str:
    """The one line on stderr of a command that exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_distillation_objectives_against_hand_computations():
    ids = torch.randint(1000, 30_000, (2, 12))
    teacher = from_pretrained(teacher_path(MINILM)).float()
    hand = student(teacher, [0, 2, 4], method="heun", steps=3)
    with torch.no_grad():
        target, out = teacher(ids).last_hidden_state, hand(ids).last_hidden_state
    mse = ((out - target) ** 2).mean()
    cosine = (F.normalize(out.mean(1), dim=-1) * F.normalize(target.mean(1), dim=-1)).sum(-1).mean()
    expected = {"hidden": mse, "embedding": 1 - cosine, "both": mse + 1 - cosine}
    for objective, value in expected.items():
        module = LitFineTune(MINILM, layers=(0, 2, 4), method="heun", steps=3, objective=objective)
        with torch.no_grad():
            loss = module.model_step((ids, ids), "val")
        torch.testing.assert_close(loss, value, rtol=1e-5, atol=1e-6)
    assert 0.01 < cosine < 0.99  # the dropped layers and Heun moved the embedding: the check above is no 0 = 0


def test_a_student_of_every_layer_starts_as_the_teacher():
    module = LitFineTune(MINILM, layers=tuple(range(6)), method="euler", steps=6, objective="both")
    with torch.no_grad():
        loss = module.model_step((torch.randint(1000, 30_000, (2, 12)),) * 2, "val")
    assert 0 <= loss < 1e-6  # hidden MSE + (1 - cosine), both >= 0


def test_the_lm_objective_is_the_students_cross_entropy(gpt2):
    directory, _ = gpt2
    module = LitFineTune(str(directory), layers=(0, 3), method="heun", steps=2, objective="lm")
    ids = torch.randint(0, module.model.embed.word.num_embeddings, (2, 10))
    hand = student(from_pretrained(str(directory)).float(), [0, 3], method="heun", steps=2)
    with torch.no_grad():
        expected = F.cross_entropy(hand(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = module.model_step((ids[:, :-1], ids[:, 1:]), "val")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_distillation_training_flops_count_the_teachers_forward_pass(gpt2):
    # By hand for MiniLM (d = 384, FFN 1536, context 64), per token: Heun x3 evaluates each
    # layer's attention and FFN 6 times, forward and backward (3x); the 6-layer teacher once each,
    # forward only.
    attention, ffn = 4 * 2 * 384 * 384 + 2 * 2 * 64 * 384, 2 * 2 * 384 * 1536
    module = LitFineTune(MINILM, layers=(0, 2, 4), method="heun", steps=3, objective="both", context=64)
    with torch.no_grad():
        nfe = module.model(torch.randint(1000, 30_000, (1, 8))).stats.nfe
    assert module.training_flops_per_token(nfe) == (3 * 6 + 6) * (attention + ffn)
    # Trained by its own loss, the teacher does not run: the student's count alone.
    module = LitFineTune(str(gpt2[0]), layers=(0, 3), method="heun", steps=2, objective="lm", context=16)
    with torch.no_grad():
        nfe = module.model(torch.randint(0, 100, (1, 8))).stats.nfe
    assert module.training_flops_per_token(nfe) == 3 * forward_flops_per_token(module.model, nfe, 16) > 0
    with pytest.raises(ValueError, match="FLOPs per token need the model's context"):
        LitFineTune(MINILM, layers=(0, 2, 4), objective="both").training_flops_per_token(nfe)  # no context


@pytest.mark.parametrize("arguments, error, message", [
    ({"teacher": "no/such/dir"}, FileNotFoundError, "is neither a transformers checkpoint directory nor one of"),
    ({"objective": "lm"}, ValueError, "objective='lm' needs a teacher with a language-model head"),
    ({"objective": "kl"}, ValueError, "unknown objective 'kl'"),
    ({"vocab_size": 50_257}, ValueError, "the data has 50257 token ids but the teacher's vocabulary has 30522"),
    ({"context": 1024}, ValueError, "context 1024 exceeds the teacher's 512 positions"),
    ({"layers": (0, 2, 7)}, ValueError, r"layers must be strictly increasing source times in \[0, 5\]"),
])
def test_bad_arguments_are_refused(arguments, error, message):
    with pytest.raises(error, match=message):
        LitFineTune(**{"teacher": MINILM, **arguments})


def test_the_command_refuses_bad_input_in_one_line(minilm_data, gpt2, cli_in_tmp, tmp_path, capsys):
    tiny = tiny_minilm(minilm_data, tmp_path)
    line = refused(lambda: run(["fit", *tiny, "--model.teacher=nowhere"]), capsys)
    assert line.startswith("svflow-ode-finetune: error: configuration error: teacher 'nowhere' is neither")
    line = refused(lambda: run(["fit", *tiny, f"--model.teacher={gpt2[0]}", "--model.layers=[0, 3]"]), capsys)
    assert "the data has 30522 token ids but the teacher's vocabulary has" in line
    line = refused(lambda: run(["fit", *tiny, "--model.objective=lm"]), capsys)
    assert "needs a teacher with a language-model head" in line
    line = refused(lambda: run(["fit", *tiny, "--model.layers=[4, 2]"]), capsys)
    assert "layers must be strictly increasing" in line
    assert not list(tmp_path.glob("lightning_logs/version_*"))  # no run directory left behind


def test_the_command_fits_resumes_and_tests_minilm(minilm_data, cli_in_tmp, tmp_path, capsys):
    tiny = tiny_minilm(minilm_data, tmp_path)
    cli = run(["fit", *tiny, "--trainer.max_steps=2"])
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    assert cli.trainer.global_step == 2 and cli.model.model.context == 16
    assert {"teacher", "layers", "method", "vocab_size", "context"} <= set(torch.load(ckpt)["hyper_parameters"])
    resumed = run(["fit", *tiny, "--trainer.max_steps=3", f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == 3
    line = refused(lambda: run(["fit", *tiny, "--model.method=rk4", f"--ckpt_path={ckpt}"]), capsys)
    assert "was trained with another model configuration: model.method: 'heun' (checkpoint) vs 'rk4'" in line
    tested = run(["test", *tiny, f"--ckpt_path={ckpt}"])
    assert 0 < tested.trainer.callback_metrics["test/cosine"] <= 1
    # The sweep collects a fine-tuning checkpoint's costs too: the student's, with 3 parameter sets.
    costs = sweep.model_costs(ckpt, train_nfe=12.0)
    assert costs["method"] == "heun" and costs["steps"] == 3 and costs["context"] == 16
    assert costs["params"] == sum(p.numel() for p in cli.model.model.parameters())
    # Its training FLOPs include the teacher's forward pass (the "both" objective distils).
    student_only = training_flops_per_token(cli.model.model, 12.0, 16)
    assert costs["train_flops_per_token"] == cli.model.training_flops_per_token(12.0) > student_only


def train_losses(log_dir: Path) -> list[float]:
    with open(log_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_a_random_gpt2_converted_fine_tuned_with_heun_resumed_and_sampled(gpt2, cli_in_tmp, tmp_path, capsys):
    directory, data = gpt2
    options = ["fit", f"--config={CONFIG}", f"--model.teacher={directory}", "--model.layers=[0, 3]",
               "--model.method=heun", "--model.steps=2", "--model.objective=lm", "--model.lr=1e-2",
               "--model.warmup_steps=0", "--model.max_steps=40", f"--data.path={data}", "--data.context=16",
               "--data.batch_size=8", "--data.val_size=16", "--trainer.val_check_interval=20",
               "--trainer.log_every_n_steps=1", *callbacks_and_logger(tmp_path)]
    whole = run([*options, "--trainer.max_steps=40"])
    losses = train_losses(Path(whole.trainer.logger.log_dir))
    assert len(losses) == 40 and losses[-1] < losses[0] - 3  # from ln(vocab) ~ 5.6 to the repeated line's
    # Stopped at 20 steps and resumed: the same weights as the uninterrupted run, bit for bit.
    half = run([*options, "--trainer.max_steps=20"])
    ckpt = Path(half.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    resumed = run([*options, "--trainer.max_steps=40", f"--ckpt_path={ckpt}"])
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # Samples decode through the data's BPE: greedy, the trained model writes the line's words.
    last = str(Path(whole.trainer.logger.log_dir) / "checkpoints" / "last.ckpt")
    text = sample_module.sample(last, prompt="to be", num_chars=30, top_k=1)
    assert text.startswith("to be") and len(text) > 40 and set(text.split()) <= set(LINE.split())
    sample_module.main([last, "--prompt=that is", "--num_chars=5", "--seed=3"])
    assert capsys.readouterr().out.startswith("that is")
    line = refused(lambda: sample_module.main([last, "--tokenizer=nowhere"]), capsys)
    assert line == "svflow-ode-sample: error: tokenizer directory not found: nowhere"


def test_the_compression_grid_runs_the_finetune_command():
    grid = sweep.load_grid(GRID, smoke=True)
    assert {r["point"] for r in grid["runs"]} == {"euler_x3", "euler_x6", "heun_x3", "rk4_x3"}
    args = sweep.command(grid, Path("point.yaml"), "fit", None)
    assert args[1:4] == ["-m", "svflow_ode.training.finetune", "fit"]


def test_the_compression_study_table_and_verdict(tmp_path):
    from experiments import minilm_compression as study

    def result(point, seed, cosine):
        return {"point": point, "data.init_args.seed": seed, "params": 17, "evaluation": {
            "cosine": cosine, "top10": 0.5, "spearman": 0.6, "nfe": 12.0, "inference_flops": 2e7}}

    results = [result("heun_x3", 0, 0.90), result("heun_x3", 1, 0.92), result("euler_x6", 0, 0.80),
               result("euler_x6", 1, 0.86)]
    baselines = [{"model": "teacher", "params": 22, "cosine": 1.0, "top10": 1.0, "spearman": 1.0, "nfe": 12.0,
                  "inference_flops": 2e7}]
    paths = study.write(tmp_path, results, baselines, "python -m experiments.minilm_compression")
    assert [p.name for p in paths] == ["compression_study.csv", "compression_study.png", "compression_study.md"]
    text = paths[-1].read_text()
    # Paired differences 0.10 and 0.06: mean 0.08, standard error 0.02; 0.08 - 2 * 0.02 > 0.
    assert ("heun_x3 minus euler_x6, mean cosine to the teacher: +0.0800 +/- 0.0200 (n = 2 seeds); Heun x3 is "
            "better beyond 2 standard errors") in text
    assert ("heun_x3 minus euler_x6, top-10 neighbour agreement: +0.0000 +/- 0.0000 (n = 2 seeds); no difference "
            "beyond 2 standard errors") in text
    assert "heun_x3 trails the teacher by 0.0900" in text and "euler_x6 trails the teacher by 0.1700" in text
    assert "| heun_x3, distilled | 2 | 0.9100 +/- 0.0100 |" in text
