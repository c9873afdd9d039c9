"""Depth and step size: train with N steps, integrate with M steps and other solvers.

Character LMs (``experiments.char_lm`` data) on the solver sweep's architecture (``norm="sphere"``,
``splitting="none"``, relaxed steps), trained with Euler and N steps under three parametrisations
of time, then evaluated with M in {N/4, N/2, N, 2N, 4N} steps of Euler, Heun, RK4 and RKMK4:

- per-step: N parameter sets, one per unit interval. Only multiples of N steps are defined (a
  coarser step would straddle parameter sets: the field is undefined between them), so M >= N;
- shared: one parameter set over t in [0, N] (an autonomous field);
- continuous: K parameter sets interpolated linearly in t (any M is defined).

Shared and continuous are also trained with a step count drawn per batch from {N/2, ..., 2N}, to
see whether that buys robustness to the step count at evaluation.

    python -m experiments.depth_sweep [--n 8] [--k 4] [--steps 400] [--seeds 0 1] [--smoke]

writes experiments/results/depth_sweep.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.char_lm import DATA, CharData, train  # noqa: E402
from experiments.solver_sweep import COLOURS, evaluate, write_csv  # noqa: E402
from svflow_ode.lm import SVFlowLM  # noqa: E402

SOLVERS = ("euler", "heun", "rk4", "rkmk4")


@dataclass(frozen=True)
class Config:
    """One trained model: how its parameters depend on t, and how its step count is chosen."""

    time: str  # "per_step", "shared" or "continuous"
    randomised: bool = False

    @property
    def name(self) -> str:
        return self.time.replace("_", "-") + (", random N" if self.randomised else "")


CONFIGS = (Config("per_step"), Config("shared"), Config("continuous"), Config("shared", True),
           Config("continuous", True))


def build(config: Config, args) -> SVFlowLM:
    # per-step and shared have N units of time (N sets, or one set over [0, N]); continuous has K nodes.
    layers = args.k if config.time == "continuous" else args.n
    return SVFlowLM(args.vocab_size, args.d_model, args.heads, layers, context=args.context, norm="sphere",
                    time=config.time, splitting="none", steps=args.n, init="nanogpt")


def eval_steps(config: Config, n: int) -> list[int]:
    """The evaluated step counts M: multiples of N for per-step parameters, else N/4 to 4N."""
    return [m for m in (n // 4, n // 2, n, 2 * n, 4 * n) if m >= 1 and (config.time != "per_step" or m % n == 0)]


def train_config(config: Config, seed: int, data: CharData, args) -> tuple[SVFlowLM, float]:
    torch.manual_seed(seed)
    model = build(config, args)
    draw = random.Random(seed)

    def forward(model, ids):  # a step count per batch, drawn from {N/2, ..., 2N} when randomised
        steps = draw.randint(args.n // 2, 2 * args.n) if config.randomised else args.n
        return model(ids, steps=steps), 0.0

    start = time.perf_counter()
    train(model, data, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=seed, forward=forward,
          desc=f"{config.name} seed {seed}")
    return model, time.perf_counter() - start


def eval_grid(model: SVFlowLM, config: Config, seed: int, val: torch.Tensor, args) -> list[dict]:
    """Validation loss for every solver and evaluated M (RKMK4 up to ``args.rkmk4_max_m`` steps)."""
    rows = []
    for method in SOLVERS:
        for m in eval_steps(config, args.n):
            if method == "rkmk4" and m > args.rkmk4_max_m:
                continue
            start = time.perf_counter()
            loss, nfe = evaluate(model, val, method=method, steps=m, batch_size=8 if method == "rkmk4" else 64)
            rows.append({"config": config.name, "seed": seed, "method": method, "M": m, "nfe": nfe,
                         "val_loss": loss, "eval_s": time.perf_counter() - start})
    return rows


def curves(rows: list[dict]) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """``(config, method) -> {M: (mean, std) over seeds}``."""
    out = {}
    for key in dict.fromkeys((r["config"], r["method"]) for r in rows):
        by_m = {}
        for r in rows:
            if (r["config"], r["method"]) == key:
                by_m.setdefault(r["M"], []).append(r["val_loss"])
        out[key] = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in by_m.items()}
    return out


def plot(table, n: int, path: Path) -> None:
    names = list(dict.fromkeys(c.name for c in CONFIGS))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), sharey=True)
    for ax, name in zip(axes, names):
        for method in SOLVERS:
            curve = table.get((name, method))
            if not curve:
                continue
            ms = sorted(curve)
            ax.errorbar(ms, [curve[m][0] for m in ms], yerr=[curve[m][1] for m in ms], marker="o", ms=3,
                        capsize=2, color=COLOURS[method], label=method)
        ax.axvline(n, color="grey", lw=0.8, ls=":")
        ax.set(title=name, xscale="log", xlabel="evaluation steps M")
        ax.set_xticks(sorted({m for (c, _), cur in table.items() if c == name for m in cur}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
    axes[0].set_ylabel("validation loss (nats/char)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worst_gap(curve: dict[int, tuple[float, float]], n: int) -> tuple[int, float]:
    """The M != N with the largest loss increase over M = N, and that increase."""
    m = max((m for m in curve if m != n), key=lambda m: curve[m][0])
    return m, curve[m][0] - curve[n][0]


def rkmk4_cost(rows: list[dict]) -> float:
    """Mean ratio of RKMK4's to RK4's evaluation time at the same model and M."""
    time_of = {(r["config"], r["seed"], r["method"], r["M"]): r["eval_s"] for r in rows}
    return statistics.mean(t / time_of[(c, s, "rk4", m)]
                           for (c, s, method, m), t in time_of.items() if method == "rkmk4")


def seed_spreads(rows: list[dict], config: str) -> dict[int, float]:
    """Per seed: max - min of Euler's validation loss over the evaluated M."""
    out = {}
    for seed in dict.fromkeys(r["seed"] for r in rows):
        losses = [r["val_loss"] for r in rows if (r["config"], r["method"], r["seed"]) == (config, "euler", seed)]
        out[seed] = max(losses) - min(losses)
    return out


def _per_seed(spreads: dict[int, float]) -> str:
    return ", ".join(f"{v:.4f}" for v in spreads.values()) + f" (mean {statistics.mean(spreads.values()):.4f})"


def write_md(rows, walls, args, source: str, path: Path) -> None:
    n, table = args.n, curves(rows)
    all_m = sorted({r["M"] for r in rows})
    lines = [
        "# Depth and step size: train with N steps, integrate with M"
        + (" — SMOKE RUN, not a result" if args.smoke else ""),
        "",
        f"Data: {source}. Model: the solver sweep's architecture (`norm=\"sphere\"`, `splitting=\"none\"`, relaxed), "
        f"d = {args.d_model}, {args.heads} heads, context {args.context}; trained with Euler, N = {n} steps "
        f"(randomised: N drawn per batch uniformly from {{{n // 2}, ..., {2 * n}}}), AdamW lr {args.lr} cosine, batch "
        f"{args.batch}, {args.steps} steps, seeds {args.seeds}. Per-step: {n} parameter sets on t in [0, {n}]; "
        f"shared: one set on [0, {n}]; continuous: {args.k} sets interpolated on [0, {args.k}]. Validation: "
        f"{args.val_windows} fixed windows of {args.context} characters, the same for every model, solver and M "
        "(differences across M and solvers are paired). Per-step parameters are evaluated only at M = N, 2N, 4N: "
        f"with fewer steps than parameter sets a step would have to straddle sets, where the field is undefined "
        f"(SVFlow refuses). RKMK4 (d × d matrix exponentials per token: {rkmk4_cost(rows):.0f}× the wall time of RK4 "
        f"at the same M here) is evaluated up to M = {args.rkmk4_max_m} only.",
        "",
        "Validation loss, mean ± std over seeds:",
        "",
        "| model | solver | " + " | ".join(f"M = {m}" for m in all_m) + " |",
        "|---|---|" + "---|" * len(all_m),
    ]
    for (name, method), curve in table.items():
        cells = [f"{curve[m][0]:.4f} ± {curve[m][1]:.4f}" if m in curve else "—" for m in all_m]
        lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "Training wall time (s, mean over seeds): "
              + ", ".join(f"{name} {statistics.mean(w):.0f}" for name, w in walls.items()) + ".", "",
              "## Verdict (computed from the table)", ""]
    for name in walls:
        euler = table[(name, "euler")]
        m_bad, gap = worst_gap(euler, n)
        shifts = ", ".join(f"M = {m}: {euler[m][0] - euler[n][0]:+.4f}" for m in sorted(euler) if m != n)
        best = min(((method, m) for (c, method), cur in table.items() if c == name for m in cur),
                   key=lambda k: table[(name, k[0])][k[1]][0])
        rk4 = table[(name, "rk4")]
        finest, finer = sorted(rk4)[-1], sorted(rk4)[-2]
        limit = rk4[finest][0]  # the closest we get to the exact flow of the field
        lines.append(
            f"- {name}: Euler at M = N = {n}: {euler[n][0]:.4f}; change with M (Euler): {shifts}; worst M = {m_bad} "
            f"({gap:+.4f}). Best of all solvers and M: {best[0]} at M = {best[1]} "
            f"({table[(name, best[0])][best[1]][0]:.4f}). The flow (approximated by RK4 at M = {finest}, which moves "
            f"{rk4[finest][0] - rk4[finer][0]:+.4f} from M = {finer}): {limit:.4f}, {limit - euler[n][0]:+.4f} against "
            "the trained discretisation."
        )
    lines += [""]
    for time_mode in ("shared", "continuous"):
        fixed = seed_spreads(rows, time_mode)
        rand = seed_spreads(rows, f"{time_mode}, random N")
        at_n = table[(f"{time_mode}, random N", "euler")][n][0] - table[(time_mode, "euler")][n][0]
        robust = all(rand[s] < fixed[s] for s in fixed)
        lines.append(
            f"- Randomised N, {time_mode}: Euler's loss range (max − min over the evaluated M) per seed is "
            f"{_per_seed(rand)} nats against {_per_seed(fixed)} with fixed N; at M = N it changes the loss by "
            f"{at_n:+.4f} nats. " + ("It buys step-size robustness (smaller range in every seed)." if robust
                                     else "It does not buy step-size robustness in every seed.")
        )
    lines += ["", "![validation loss vs evaluation steps M](depth_sweep.png)", ""]
    path.write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="text file (falls back to generated text)")
    parser.add_argument("--n", type=int, default=8, help="training steps N (a multiple of 4)")
    parser.add_argument("--k", type=int, default=4, help="parameter sets of the continuous model")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--rkmk4-max-m", type=int, default=None, help="largest M for RKMK4 (default N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: checks the pipeline only")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/depth_sweep"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.k, args.steps, args.d_model, args.heads = 4, 2, 3, 16, 2
        args.context, args.batch, args.val_windows, args.seeds = 16, 4, 4, [0]
    args.rkmk4_max_m = args.n if args.rkmk4_max_m is None else args.rkmk4_max_m
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = CharData.load(args.data)
    args.vocab_size = len(data.vocab)
    val = data.windows("val", args.val_windows, args.context + 1, torch.Generator().manual_seed(1234))
    start = time.perf_counter()
    rows, walls = [], {}
    for seed, config in tqdm([(s, c) for s in args.seeds for c in CONFIGS], desc="depth sweep"):
        model, wall = train_config(config, seed, data, args)
        walls.setdefault(config.name, []).append(wall)
        rows += [{**r, "train_s": wall} for r in eval_grid(model, config, seed, val, args)]
        write_csv(rows, args.out.with_suffix(".csv"))  # partial results survive an interruption
    plot(curves(rows), args.n, args.out.with_suffix(".png"))
    write_md(rows, walls, args, data.source, args.out.with_suffix(".md"))
    with open(args.out.with_suffix(".md"), "a") as f:
        f.write(f"Total wall time of this sweep: {time.perf_counter() - start:.0f} s.\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
