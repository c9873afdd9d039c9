"""Forward+backward time of the Euler SVFlow vs an equally sized plain PyTorch Transformer.

Both use the same SDPA attention, post-LN, identical sizes; measured side by side, interleaved,
median of repeats. Prints the ratio (target <= 1.05) and writes experiments/results/model_bench.md.

    python -m experiments.bench_model [--repeats 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svflow_ode.lm import SVFlowLM


class PlainBlock(nn.Module):
    """A post-LN Transformer layer, nanoGPT-style, with SDPA."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(B, T, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = self.ln1(x + self.proj(y))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class PlainLM(nn.Module):
    def __init__(self, vocab, d, heads, layers, context):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.ln(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    vocab, d, heads, layers, T = 65, 128, 4, 4, 64
    ours = SVFlowLM(vocab, d, heads, layers, context=T, norm="post_ln")
    plain = PlainLM(vocab, d, heads, layers, T)
    idx = torch.randint(0, vocab, (args.batch, T))
    targets = torch.randint(0, vocab, (args.batch, T))

    def step_ours():
        loss = F.cross_entropy(ours(idx).logits.flatten(0, 1), targets.flatten())
        loss.backward()

    def step_plain():
        loss = F.cross_entropy(plain(idx).flatten(0, 1), targets.flatten())
        loss.backward()

    for fn in (step_ours, step_plain):  # warm-up
        _time(fn, 3)
    t_ours, t_plain = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t_ours += _time(step_ours, 1)
        t_plain += _time(step_plain, 1)
    m_ours, m_plain = statistics.median(t_ours), statistics.median(t_plain)
    ratio = m_ours / m_plain
    n_ours = sum(p.numel() for p in ours.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    lines = [
        "# Euler SVFlow vs plain Transformer: forward + backward",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Post-LN, {layers} layers, d={d}, {heads} heads, "
        f"context {T}, batch {args.batch}, float32; median of {args.repeats} interleaved repeats.",
        "",
        "| model | parameters | fwd+bwd (ms) |",
        "|---|---|---|",
        f"| SVFlow (euler, 1 step/layer) | {n_ours} | {1e3 * m_ours:.2f} |",
        f"| plain PyTorch Transformer | {n_plain} | {1e3 * m_plain:.2f} |",
        "",
        f"Ratio SVFlow / plain: **{ratio:.3f}** (target <= 1.05).",
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
