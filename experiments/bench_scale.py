"""Depth and scale benchmarks, each measured side by side in one run (issue: depth and scale).

1. Training step time and memory vs number of steps (1..64) for each memory mode
   (backprop, checkpoint, adjoint), on one model that admits all three (pre-LN state in R^d, one
   summed field, continuous-in-time parameters, Euler).
   Memory is reported two ways: the bytes of activations saved for backward at the end of the
   forward pass (deterministic: the quantity that grows with depth), and the peak resident-set
   growth of a fresh process running one training step (real, includes the backward pass). The
   latter runs with glibc's mmap threshold fixed at 64 KiB, so that every freed tensor goes back
   to the system and the resident set follows the live tensors: with the default (adaptive)
   threshold freed blocks stay in the heap, and the resident set of identical runs varies by
   up to 3x (64 checkpointed steps: 93 to 303 MiB over 9 runs on a 2-core x86_64 machine).
   jemalloc follows the live tensors too.
2. Step time and memory vs sequence length (Euler, backprop).
3. Compiled vs eager training step, and the Euler SVFlow vs an equally sized plain PyTorch
   Transformer (both compiled and both eager), interleaved repeats.
4. Achieved FLOP/s of the Euler training step as a fraction of this machine's measured float32
   matmul peak.

    python -m experiments.bench_scale [--quick] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from experiments.bench_model import PlainLM
from svflow_ode.lm import SVFlowLM

VOCAB = 65


def depth_model(steps: int, gradient: str, d: int = 128, layers: int = 4, seq: int = 128) -> SVFlowLM:
    return SVFlowLM(VOCAB, d, 4, layers, context=seq, norm="pre_ln", time="continuous",
                    splitting="none", method="euler", steps=steps, gradient=gradient)


def loss_of(model, ids, targets):
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out  # SVFlowOutput or a plain tensor
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_step(model, ids, targets, optimizer=None):
    loss = loss_of(model, ids, targets)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss


def saved_activation_bytes(model, ids, targets) -> int:
    """Bytes of the distinct tensors autograd keeps for backward after one forward pass."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids, targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _rss_child(spec: str) -> None:
    """In a fresh process: peak RSS growth (bytes) over one training step, sampled every ~1 ms."""
    cfg = json.loads(spec)
    torch.manual_seed(0)
    model = depth_model(cfg["steps"], cfg["gradient"], seq=cfg["seq"])
    ids = torch.randint(0, VOCAB, (cfg["batch"], cfg["seq"]))
    train_step(model, ids[:1, :8], ids[:1, :8])  # load kernels at negligible size
    baseline, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    train_step(model, ids, ids)
    done.set()
    sampler.join()
    print(json.dumps({"rss_growth": max(peak[0], _rss()) - baseline}))


def peak_rss_growth(steps: int, gradient: str, batch: int, seq: int) -> int:
    spec = json.dumps({"steps": steps, "gradient": gradient, "batch": batch, "seq": seq})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set
    out = subprocess.run([sys.executable, "-m", "experiments.bench_scale", "--rss-child", spec],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, calls interleaved so drift hits all alike; each
    round starts one function later, so none always runs right after the same one."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / median_time(lambda: a @ b, repeats)


def train_flops(d: int, layers: int, seq: int, batch: int, vocab: int, nfe_per_layer: int = 1) -> float:
    """Matmul FLOPs of one training step (forward x 3 for forward + backward)."""
    tokens = batch * seq
    per_eval = {
        "qkv": 2 * tokens * d * 3 * d,
        "attn": 2 * 2 * batch * seq * seq * d,  # scores and weighted sum
        "proj": 2 * tokens * d * d,
    }
    attn = sum(per_eval.values())
    ffn = 2 * 2 * tokens * d * 4 * d
    head = 2 * tokens * d * vocab
    return 3 * (layers * nfe_per_layer * (attn + ffn) + head)


def load() -> str:
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child)
    torch.manual_seed(0)
    started = time.perf_counter()
    repeats = 3 if args.quick else 10
    depth_repeats = 1 if args.quick else 3  # a 64-step adjoint step takes seconds
    step_counts = [1, 8, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    batch, seq = 8, 128
    ids = torch.randint(0, VOCAB, (batch, seq))
    threads = os.environ.get("OMP_NUM_THREADS")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    lines = [
        "# Depth and scale benchmarks",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"float32. Command: `{env}python -m experiments.bench_scale{' --quick' if args.quick else ''}`. "
        f"At the start: {load()}.",
        "",
        "## 1. Memory and time vs number of steps",
        "",
        f"Pre-LN SVFlow (Euclidean state, one summed field, continuous parameters), d=128, 4 parameter "
        f"sets, Euler, batch {batch} x {seq} tokens. *checkpoint* is two-level: segments of ceil(sqrt(steps)) "
        f"steps, each step checkpointed inside its segment (`solvers.checkpointed_steps`). *Saved* = "
        f"activation bytes autograd holds after the forward pass; *peak RSS* = resident-set growth of a "
        f"fresh process over one training step (sampled every ~1 ms; includes gradients and the backward "
        f"pass's transient tensors), with glibc's mmap threshold fixed at 64 KiB so that freed tensors "
        f"leave the resident set (with the default adaptive threshold the heap keeps them, and the "
        f"resident set varies between identical runs). Step time: median of {depth_repeats}.",
        "",
        "| gradient | steps | step time (ms) | saved (MiB) | peak RSS growth (MiB) |",
        "|---|---|---|---|---|",
    ]
    results = {}
    for gradient in tqdm(("backprop", "checkpoint", "adjoint"), desc="memory modes"):
        for steps in tqdm(step_counts, desc=gradient, leave=False):
            model = depth_model(steps, gradient)
            saved = saved_activation_bytes(model, ids, ids)
            seconds = median_time(lambda: train_step(model, ids, ids), depth_repeats)
            rss = peak_rss_growth(steps, gradient, batch, seq)
            results[gradient, steps] = (saved, rss)
            lines.append(f"| {gradient} | {steps} | {1e3 * seconds:.1f} | {saved / 2**20:.1f} | {rss / 2**20:.1f} |")
    lines += ["", "Growth from 8 to 64 steps (64-step memory / 8-step memory):", ""]
    for gradient in ("backprop", "checkpoint", "adjoint"):
        (s8, r8), (s64, r64) = results[gradient, 8], results[gradient, 64]
        lines.append(f"- {gradient}: saved x{s64 / s8:.2f}, peak RSS x{r64 / max(r8, 1):.2f}")

    lines += ["", "## 2. Sequence length (Euler, backprop, 4 steps)", "",
              "| tokens | step time (ms) | saved (MiB) |", "|---|---|---|"]
    for length in tqdm([64, 128, 256] if args.quick else [64, 128, 256, 512, 1024], desc="sequence length"):
        model = SVFlowLM(VOCAB, 128, 4, 4, context=length, norm="post_ln")
        x = torch.randint(0, VOCAB, (batch, length))
        saved = saved_activation_bytes(model, x, x)
        seconds = median_time(lambda: train_step(model, x, x), repeats)
        lines.append(f"| {length} | {1e3 * seconds:.1f} | {saved / 2**20:.1f} |")

    lines += ["", "## 3. Eager vs compiled; SVFlow vs plain Transformer", ""]
    d, layers, T, B = 128, 4, 64, 12
    x = torch.randint(0, VOCAB, (B, T))
    models = {"SVFlow euler": SVFlowLM(VOCAB, d, 4, layers, context=T, norm="post_ln"),
              "SVFlow rk4": SVFlowLM(VOCAB, d, 4, layers, context=T, norm="post_ln", method="rk4"),
              "plain Transformer": PlainLM(VOCAB, d, 4, layers, T)}
    fns = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fns[f"{name}, eager"] = (lambda m, o: lambda: train_step(m, x, x, o))(model, opt)
        if not args.no_compile:
            compiled = torch.compile(model)
            fns[f"{name}, compiled"] = (lambda m, o: lambda: train_step(m, x, x, o))(compiled, opt)
    for name, fn in tqdm(fns.items(), desc="warm-up / compile"):
        fn(), fn()
    before = load()
    times = interleaved(fns, 5 * repeats)
    lines += [f"Training step (forward, backward, AdamW), post-LN, d={d}, {layers} layers, batch {B} x {T}; "
              f"median of {5 * repeats} interleaved repeats; {before} before, {load()} after.",
              "", "| model | step (ms) |", "|---|---|"]
    lines += [f"| {name} | {1e3 * t:.2f} |" for name, t in times.items()]
    lines.append("")
    for kind in ("eager",) + (() if args.no_compile else ("compiled",)):
        ratio = times[f"SVFlow euler, {kind}"] / times[f"plain Transformer, {kind}"]
        lines.append(f"- {kind}: SVFlow euler / plain Transformer = **{ratio:.3f}**")
    if not args.no_compile:
        for name in ("SVFlow euler", "SVFlow rk4", "plain Transformer"):
            lines.append(f"- {name}: compiled / eager = **{times[f'{name}, compiled'] / times[f'{name}, eager']:.3f}**")

    peak = matmul_peak()
    flops = train_flops(d, layers, T, B, VOCAB)
    achieved = flops / times["SVFlow euler, eager"]
    lines += ["", "## 4. Achieved FLOP/s", "",
              f"Measured float32 matmul peak (1024^2 sgemm): {peak / 1e9:.1f} GFLOP/s. "
              f"Euler SVFlow training step: {flops / 1e9:.3f} GFLOP (matmuls, x3 for backward) in "
              f"{1e3 * times['SVFlow euler, eager']:.1f} ms = {achieved / 1e9:.1f} GFLOP/s, "
              f"**{100 * achieved / peak:.0f}%** of peak (eager).",
              "", f"Whole run: {(time.perf_counter() - started) / 60:.1f} min; at the end: {load()}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_bench.md").write_text(text)


if __name__ == "__main__":
    main()
