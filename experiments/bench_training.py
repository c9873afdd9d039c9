"""Training-step time of the Euler SVFlow LM against an equally sized plain post-LN Transformer.

Both models have the same parameters (separate q/k/v projections, ``scaled_dot_product_attention``,
GELU FFN, LayerNorm after each residual and on the embedding, tied head) at the Tiny Shakespeare
size (4 layers, 4 heads, 128 dims, context 64, batch 12). A step is forward + backward + AdamW.
The two are timed in interleaved repeats in one process; the ratio of the medians is printed.

    python -m experiments.bench_training [--repeats 15] [--steps 10] [--threads 1] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svflow_ode.lm import SVFlowLM


class PostLNBlock(nn.Module):
    """``x = LN(x + attn(x)); x = LN(x + ffn(x))`` (BERT's layer), causal."""

    def __init__(self, d: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        # (B, nh, T, hs) each
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = self.ln1(x + self.o(y))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class PostLNTransformer(nn.Module):
    """Token + position embeddings, LayerNorm, post-LN blocks, tied head."""

    def __init__(self, vocab_size: int, d: int, n_heads: int, n_blocks: int, context: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab_size, d), nn.Embedding(context, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(PostLNBlock(d, n_heads, 4 * d) for _ in range(n_blocks))
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.ln(self.tokens(input_ids) + self.positions(torch.arange(T)))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (B, T, V)


def step_time(model, logits_of, batch, optimizer, steps: int) -> float:
    """Mean seconds per training step over ``steps`` steps."""
    input_ids, labels = batch
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(logits_of(model, input_ids).flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark, print and write the table; returns the time ratio SVFlow / plain."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats")
    parser.add_argument("--steps", type=int, default=10, help="training steps per repeat")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest timings)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, d, H, L, T, B = 65, 128, 4, 4, 64, 12
    models = {
        "SVFlow (Euler, post_ln)": (SVFlowLM(V, d, H, L, context=T), lambda m, x: m(x).logits),
        "plain post-LN Transformer": (PostLNTransformer(V, d, H, L, T), lambda m, x: m(x)),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in models.items()}
    if len(set(params.values())) != 1:
        raise RuntimeError(f"the models differ in size: {params}")
    batch = (torch.randint(V, (B, T)), torch.randint(V, (B, T)))
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, (m, _) in models.items()}
    times = {name: [] for name in models}
    for name, (model, logits_of) in models.items():  # warm-up
        step_time(model, logits_of, batch, optimizers[name], 3)
    for _ in range(args.repeats):
        for name, (model, logits_of) in models.items():
            times[name].append(step_time(model, logits_of, batch, optimizers[name], args.steps))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    svflow, plain = medians.values()
    ratio = svflow / plain
    lines = [
        "# Training-step time: Euler SVFlow vs plain post-LN Transformer",
        "",
        f"`python -m experiments.bench_training --repeats {args.repeats} --steps {args.steps} --threads "
        f"{args.threads}`, {args.threads} CPU thread(s), torch {torch.__version__}. Tiny Shakespeare size: {L} layers, "
        f"{H} heads, {d} dims, context {T}, batch {B}, {params[next(iter(params))]:,} parameters each. "
        "A step is forward + backward + AdamW; median over interleaved repeats.",
        "",
        "| model | ms per step (median) | min | max |",
        "|---|---|---|---|",
        *(f"| {name} | {1e3 * medians[name]:.2f} | {1e3 * min(ts):.2f} | {1e3 * max(ts):.2f} |"
          for name, ts in times.items()),
        "",
        f"Ratio SVFlow / plain: **{ratio:.3f}** (target <= 1.1).",
        "",
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_bench.md").write_text("\n".join(lines))
    return ratio


if __name__ == "__main__":
    main()
