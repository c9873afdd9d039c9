"""One short GPU benchmark: tokens/s and peak memory of Euler SVFlow, a plain Transformer, and RK4.

For a lent accelerator: run once, results go to a file. Sizes fill a modern GPU by default
(GPT-2-medium-like: d=1024, 16 heads, 12 layers, context 1024, bf16 autocast). ``--device cpu
--tiny`` runs the same code path on a toy size (the test suite does this).

    python -m experiments.bench_gpu [--device cuda] [--tiny] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from experiments.bench_model import PlainLM
from experiments.bench_scale import interleaved, saved_activation_bytes, train_step
from svflow_ode.lm import SVFlowLM


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (for CPU smoke tests)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        vocab, d, heads, layers, T, B = 65, 32, 4, 2, 32, 4
    else:
        vocab, d, heads, layers, T, B = 50304, 1024, 16, 12, 1024, 16
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    models = {
        "SVFlow euler": SVFlowLM(vocab, d, heads, layers, context=T, norm="post_ln"),
        "SVFlow rk4": SVFlowLM(vocab, d, heads, layers, context=T, norm="post_ln", method="rk4"),
        "plain Transformer": PlainLM(vocab, d, heads, layers, T),
    }
    ids = torch.randint(0, vocab, (B, T), device=device)
    fns = {}
    for name, model in models.items():
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                train_step(model, ids, ids, opt)
            if device.type == "cuda":
                torch.cuda.synchronize()

        fns[name] = step
    for fn in fns.values():
        fn()  # warm-up
    times = interleaved(fns, args.repeats)
    rows = []
    for name, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peak = torch.cuda.max_memory_allocated(device)
        else:  # no allocator statistics on CPU: count the activations kept for backward
            peak = saved_activation_bytes(models[name], ids, ids)
        rows.append({"model": name, "step_s": times[name], "tokens_per_s": B * T / times[name], "peak_bytes": peak})
    memory_kind = "peak allocated (CUDA)" if device.type == "cuda" else "saved activations (CPU)"
    name = "gpu_bench" + ("_tiny" if args.tiny else "")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    lines = [
        f"# Training throughput on {device_name}",
        "",
        f"d={d}, {heads} heads, {layers} layers, context {T}, batch {B}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, AdamW; median of {args.repeats} "
        f"interleaved steps; memory = {memory_kind}.",
        "",
        "| model | step (ms) | tokens/s | memory (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.1f} |" for r in rows]
    ratio = times["SVFlow euler"] / times["plain Transformer"]
    lines += ["", f"SVFlow euler / plain Transformer step time: **{ratio:.3f}**"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
