"""Solver sweep: does any solver beat Euler (the Transformer) at matched parameters or FLOPs?

Character LMs on Tiny Shakespeare (``experiments.char_lm``: ``../shared/data/tinyshakespeare.txt``
when present, else its generated text). Every solver runs on one architecture: ``norm="sphere"``,
``time="continuous"`` (K parameter sets interpolated in t, so any step count is defined),
``splitting="none"`` (RKMK needs the plain sphere, dopri5 the unsplit field), relaxed steps; its
Euler is a parallel-block (attention + FFN summed) post-norm Transformer without norm gains. The
standard post-LN Transformer (per-step parameters, Lie splitting, Euler) is a reference row.

- matched parameters: the same K parameter sets and K steps for every fixed-step solver (costlier
  solvers spend more FLOPs); dopri5 chooses its own steps;
- matched FLOPs: 2K field evaluations per forward: Euler 2K steps, midpoint/Heun K, RK4 K/2;
  dopri5 cannot go that low (at least 8 evaluations per parameter set): it runs at a loose
  tolerance and is placed at the FLOPs it actually used.

RKMK4 (on ``manifolds.LowRankSphereAction``, exact and O(d) per token) is in both groups: K steps
and K/2 steps.

    python -m experiments.solver_sweep [--steps 400] [--seeds 0 1 2] [--data PATH] [--smoke]
                                       [--save-dir runs/solver_sweep]

writes experiments/results/solver_sweep.{md,csv,png}, and every trained model to
``<save-dir>/<arch>_<method>_<steps or "adaptive">_seed<seed>.pt``: a ``torch.save``d dict with
``config`` (the keyword arguments of ``SVFlowLM``), ``state_dict``, and the model's csv row
(``run``, ``arch``, ``method``, ``steps``, ``seed``, ``val_loss``, ``nfe_eval``, ...).
``load_run(path)`` rebuilds the model (in eval mode) and returns it with that dict; the model's
default ``method``/``steps`` are the ones it was trained and validated with.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.char_lm import DATA, CharData, train  # noqa: E402
from solvers import SolverError  # noqa: E402
from svflow_ode.flops import training_flops_per_token  # noqa: E402
from svflow_ode.lm import SVFlowLM  # noqa: E402

# The two architectures: every solver runs on "flow"; "post_ln" is the standard Transformer.
ARCHITECTURES = {
    "flow": dict(norm="sphere", time="continuous", splitting="none"),
    "post_ln": dict(norm="post_ln", time="per_step", splitting="lie"),
}
COLOURS = {"euler": "tab:blue", "midpoint": "tab:orange", "heun": "tab:green", "rk4": "tab:red",
           "dopri5": "tab:purple", "rkmk4": "tab:brown"}


@dataclass(frozen=True)
class Run:
    """One trained configuration."""

    arch: str  # a key of ARCHITECTURES
    method: str
    steps: int | None  # None: adaptive

    @property
    def name(self) -> str:
        if self.arch == "post_ln":
            return f"post-LN Transformer (euler ×{self.steps})"
        return self.method if self.steps is None else f"{self.method} ×{self.steps}"


def sweep_runs(K: int) -> list[Run]:
    """The reference, the matched-parameter runs (K steps), and the extra matched-FLOPs runs (2K evaluations)."""
    matched_params = [Run("flow", m, K) for m in ("euler", "midpoint", "heun", "rk4", "rkmk4")]
    return [Run("post_ln", "euler", K), *matched_params, Run("flow", "dopri5", None),
            Run("flow", "euler", 2 * K), Run("flow", "rk4", K // 2), Run("flow", "rkmk4", K // 2)]


def config(run: Run, args) -> dict:
    """``SVFlowLM`` keyword arguments of the sweep's size; adaptive methods get the dopri5 tolerance and NFE cap."""
    return dict(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.heads, n_blocks=args.layers,
                context=args.context, method=run.method, steps=run.steps, rtol=args.dopri5_tol,
                atol=args.dopri5_tol, max_nfe=args.dopri5_max_nfe * args.layers, init="nanogpt",
                **ARCHITECTURES[run.arch])  # one solve restarts at each block: the cap covers them all


def validation_windows(data: CharData, args) -> torch.Tensor:
    """The fixed validation windows ``(val_windows, context + 1)`` every run is scored on."""
    return data.windows("val", args.val_windows, args.context + 1, torch.Generator().manual_seed(1234))


def load_run(path: Path) -> tuple[SVFlowLM, dict]:
    """A model saved by the sweep (see the module docstring), in eval mode, and its saved dict."""
    saved = torch.load(path, weights_only=True)
    model = SVFlowLM(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, method: str | None = None, steps: int | None = None,
             batch_size: int = 64) -> tuple[float, float]:
    """``(mean next-character loss in nats, mean NFE per forward)`` over ``windows`` ``(N, T + 1)``."""
    model.eval()
    total, nfe, batches = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        w = windows[start : start + batch_size]
        out = model(w[:, :-1], method=method, steps=steps)
        total += F.cross_entropy(out.logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        nfe, batches = nfe + out.stats.nfe, batches + 1
    return total / (len(windows) * (windows.shape[1] - 1)), nfe / batches


def train_run(run: Run, seed: int, data: CharData, val: torch.Tensor, args) -> tuple[dict, SVFlowLM | None]:
    """Train one configuration from ``seed``; returns its csv row and the model (None if it failed)."""
    torch.manual_seed(seed)  # same seed, same architecture: the same initial weights for every solver
    model = SVFlowLM(**config(run, args))
    nfes = []

    def forward(model, ids):
        out = model(ids)
        nfes.append(out.stats.nfe)
        return out, 0.0

    row = {"run": run.name, "arch": run.arch, "method": run.method, "steps": run.steps or "", "seed": seed,
           "params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    try:
        train(model, data, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=seed, forward=forward,
              desc=f"{run.name} seed {seed}")
    except SolverError as error:  # e.g. dopri5 past its NFE cap
        return {**row, "status": f"failed at step {len(nfes)}: {error}", "wall_s": time.perf_counter() - start}, None
    wall = time.perf_counter() - start
    nfe_train = sum(nfes) / len(nfes)
    val_loss, nfe_eval = evaluate(model, val)
    return {**row, "status": "ok", "nfe_train": nfe_train, "nfe_eval": nfe_eval, "val_loss": val_loss,
            "train_flops_per_token": training_flops_per_token(model, nfe_train, args.context), "wall_s": wall,
            "s_per_step": wall / args.steps}, model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(rows: list[dict], name: str, baseline: str) -> tuple[float, float, int]:
    """Mean and standard error over seeds of ``val_loss(name) - val_loss(baseline)`` (same seeds)."""
    by = {(r["run"], r["seed"]): r["val_loss"] for r in rows if r["status"] == "ok"}
    diffs = [by[(name, s)] - by[(baseline, s)] for (n, s) in by if n == name and (baseline, s) in by]
    if not diffs:
        return math.nan, math.nan, 0
    m, sd = mean_std(diffs)
    return m, sd / math.sqrt(len(diffs)), len(diffs)


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per run name: means and stds over the seeds that finished."""
    out = {}
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        s = {"seeds": len(mine), "ok": len(ok), "params": mine[0]["params"], "method": mine[0]["method"],
             "arch": mine[0]["arch"], "steps": mine[0]["steps"]}
        for key in ("val_loss", "train_flops_per_token", "nfe_train", "nfe_eval", "wall_s", "s_per_step"):
            s[key] = mean_std([r[key] for r in ok]) if ok else (math.nan, math.nan)
        out[name] = s
    return out


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the (FLOPs, loss) points no other point beats on both, cheapest first."""
    front, best = [], math.inf
    for name, (flops, loss) in sorted(points.items(), key=lambda kv: kv[1]):
        if loss < best:
            front.append(name)
            best = loss
    return front


def plot(stats: dict[str, dict], front: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    done = [n for n, s in stats.items() if s["ok"]]
    # Runs at equal FLOPs (the matched-FLOPs group) are spread by a few percent so that all show.
    flops = {n: stats[n]["train_flops_per_token"][0] for n in done}
    rank = {n: [m for m in done if flops[m] == flops[n]].index(n) for n in done}
    for name in done:
        s = stats[name]
        colour = "grey" if s["arch"] == "post_ln" else COLOURS[s["method"]]
        marker = "s" if s["arch"] == "post_ln" else "o"
        xs = (flops[name] * 1.08 ** rank[name], s["wall_s"][0])
        for ax, x, dy in zip(axes, xs, (3 - 9 * (rank[name] % 2), 3)):
            ax.errorbar(x, s["val_loss"][0], yerr=s["val_loss"][1], fmt=marker, color=colour, capsize=3)
            ax.annotate(name, (x, s["val_loss"][0]), fontsize=7, xytext=(4, dy), textcoords="offset points")
    xs = [flops[n] for n in front] + [max(flops.values()) * 1.2]
    ys = [stats[n]["val_loss"][0] for n in front]
    axes[0].step(xs, ys + ys[-1:], where="post", color="black", lw=0.8, ls="--",
                 label="Pareto front (seed means); nothing lies below it")
    axes[0].set(xscale="log", xlabel="training FLOPs per token (equal values offset for legibility)",
                ylabel="validation loss (nats/char, mean ± std over seeds)", title="loss vs training FLOPs")
    axes[0].legend(fontsize=7)
    axes[1].set(xscale="log", xlabel="training wall time (s, 1 CPU thread, shared machine)",
                title="loss vs wall time")
    ticks = sorted(set(flops.values()))
    axes[0].set_xticks(ticks, [f"{v / 1e6:.2g}M" for v in ticks])
    for ax in axes:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(ms: tuple[float, float], digits: int = 4) -> str:
    return "—" if math.isnan(ms[0]) else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def verdict_line(rows, name, baseline, stats, margin) -> tuple[str, bool, bool]:
    """One comparison as text, whether it is lower beyond noise, and whether by at least ``margin``."""
    d, se, n = paired(rows, name, baseline)
    ratio = stats[name]["train_flops_per_token"][0] / stats[baseline]["train_flops_per_token"][0]
    better, worse = d + 2 * se < 0, d - 2 * se > 0
    text = (f"{name} − {baseline}: {d:+.4f} ± {se:.4f} nats (paired over {n} seeds, ± 1 SE) at {ratio:.2f}× the "
            f"training FLOPs" + (" — lower beyond noise" if better else " — higher beyond noise" if worse else ""))
    return text, better, better and d <= -margin


def write_md(rows, stats, args, source: str, path: Path) -> None:
    K = args.layers
    flow = {n: s for n, s in stats.items() if s["arch"] == "flow"}
    euler_k, euler_2k = f"euler ×{K}", f"euler ×{2 * K}"
    matched_params = [n for n, s in flow.items() if s["steps"] in (K, "") and n != euler_k]
    budget = stats[euler_2k]["nfe_train"][0]
    matched_flops = [n for n, s in flow.items() if s["steps"] != "" and s["nfe_train"][0] == budget and n != euler_2k]
    front = pareto({n: (s["train_flops_per_token"][0], s["val_loss"][0]) for n, s in stats.items() if s["ok"]})
    lines = [
        "# Solver sweep: Euler (the Transformer) vs midpoint, Heun, RK4, RKMK4 and dopri5"
        + (" — SMOKE RUN, not a result" if args.smoke else ""),
        "",
        f"Data: {source}, character level (vocabulary {args.vocab_size}), first 90% train, last 10% validation. "
        f"Model: d = {args.d_model}, {args.heads} heads, {K} parameter sets, d_ff = {4 * args.d_model}, context "
        f"{args.context}, tied head. **Every solver runs on one architecture**: `norm=\"sphere\"`, "
        "`time=\"continuous\"` (the K parameter sets interpolated linearly in t, so every step count is defined), "
        "`splitting=\"none\"`, `mode=\"relaxed\"`: its Euler is a parallel-block (x ← (x + attn(x) + ffn(x)) "
        "normalised to radius √d) post-norm Transformer without norm gains. Reference row: the standard post-LN "
        f"Transformer (`norm=\"post_ln\"`, per-step parameters, Lie splitting, Euler). Training: AdamW "
        f"(weight decay 0.1), lr {args.lr} with 5% warm-up and cosine decay to lr/10, batch {args.batch}, "
        f"{args.steps} steps, seeds {args.seeds} (a seed fixes the initial weights and the batches, the same for "
        f"every solver of an architecture). Validation: {args.val_windows} fixed windows of "
        f"{args.context} characters, each solver integrating as it was trained. dopri5: rtol = atol = "
        f"{args.dopri5_tol:g}, NFE cap {args.dopri5_max_nfe} per block (the solve restarts at each of the "
        f"{K} block boundaries, where the interpolated parameters kink, and spends 2 evaluations choosing a "
        "first step each time: at least 8 per block). RKMK4 moves each token by rotations exp(θ) generated by the "
        "field's tangent part (RKMK has no relaxed mode: the normal part that rescales a relaxed step is dropped), "
        "through `manifolds.LowRankSphereAction`, which keeps θ factored over the step's points and field values "
        "(exact; no d × d matrices).",
        "",
        "FLOPs (`svflow_ode.flops`): matmul FLOPs per token of every field evaluation (q/k/v/output projections, "
        "scores and weighted sum over the full context, FFN) times the measured NFE, plus the head (the embedding "
        "is a lookup); training = 3 × forward. NFE per forward is the training mean (dopri5's varies); with Lie "
        "splitting (post-LN) attention and FFN count as one evaluation each, unsplit as one together. RKMK4's "
        "Lie-algebra arithmetic is not counted (per token and step: k × k matrices with k ≤ 8 and d × k products, "
        "`manifolds.LowRankSphereAction`); it shows in the wall time.",
        "",
        "Mean ± std over seeds:",
        "",
        "| run | params | NFE / forward (train) | training FLOPs / token | val loss (nats/char) | wall s (train) "
        "| s / step | seeds ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['params']:,} | {fmt(s['nfe_train'], 1)} | {s['train_flops_per_token'][0]:.3g} "
            f"| {fmt(s['val_loss'])} | {s['wall_s'][0]:.0f} | {s['s_per_step'][0]:.3f} | {s['ok']}/{s['seeds']} |"
        )
    failures = [r for r in rows if r["status"].startswith("failed")]
    for r in failures:
        lines.append(f"\nFailed: {r['run']} seed {r['seed']}: {r['status']}")
    lines += ["", f"Pareto front (loss vs training FLOPs, seed means): {' → '.join(front)}."]
    lines += ["", "## Verdict (computed from the runs above)", "",
              "A difference counts as beyond seed noise when it is more than 2 standard errors of the paired "
              f"(same-seed) difference; the stretch goal is ≥ {args.margin} nats lower and beyond noise.", "",
              f"Matched parameters ({K} parameter sets, {K} steps; dopri5 adaptive) against {euler_k}:", ""]
    wins_params, wins_flops = [], []
    for name in matched_params:
        text, better, _ = verdict_line(rows, name, euler_k, stats, args.margin)
        lines.append(f"- {text}.")
        wins_params += [name] if better else []
    lines += ["", f"Matched training FLOPs ({budget:.0f} field evaluations per forward) against {euler_2k}:", ""]
    for name in matched_flops:
        text, better, stretch = verdict_line(rows, name, euler_2k, stats, args.margin)
        lines.append(f"- {text}{' (stretch goal met)' if stretch else ''}.")
        wins_flops += [name] if better else []
    dopri = stats.get("dopri5")
    if dopri and dopri["ok"]:
        used = dopri["train_flops_per_token"][0] / stats[euler_2k]["train_flops_per_token"][0]
        cheaper = [n for n in stats if stats[n]["ok"] and stats[n]["val_loss"][0] <= dopri["val_loss"][0]
                   and stats[n]["train_flops_per_token"][0] < dopri["train_flops_per_token"][0]]
        lines.append(
            f"- dopri5 could not be brought down to the budget: at rtol = atol = {args.dopri5_tol:g} it used "
            f"{dopri['nfe_train'][0]:.1f} evaluations per training forward ({used:.1f}× the budget's FLOPs; "
            f"{dopri['nfe_eval'][0]:.1f} at validation); cheaper runs with a loss at least as low: "
            f"{', '.join(cheaper) or 'none'}."
        )
    ref = stats[f"post-LN Transformer (euler ×{K})"]
    lines += [
        "",
        "**Answer.** At matched parameters: "
        + (f"{', '.join(wins_params)} beat {euler_k} beyond seed noise, at higher FLOPs." if wins_params
           else f"no non-Euler solver beats {euler_k} beyond seed noise.")
        + " At matched FLOPs: "
        + (f"{', '.join(wins_flops)} beat {euler_2k} beyond seed noise." if wins_flops
           else f"no non-Euler solver beats {euler_2k} beyond seed noise.")
        + f" Reference: the post-LN Transformer reaches {fmt(ref['val_loss'])} at "
        f"{ref['train_flops_per_token'][0]:.3g} training FLOPs/token, against {fmt(stats[euler_k]['val_loss'])} for "
        f"the sweep architecture's {euler_k}.",
        "",
        "![validation loss vs training FLOPs and wall time](solver_sweep.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="text file (falls back to generated text)")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="parameter sets K (even)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-windows", type=int, default=128)
    parser.add_argument("--dopri5-tol", type=float, default=1.0, help="rtol = atol of dopri5")
    parser.add_argument("--dopri5-max-nfe", type=int, default=200, help="dopri5's NFE cap per block")
    parser.add_argument("--margin", type=float, default=0.02, help="stretch goal, nats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: checks the pipeline only")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/solver_sweep"))
    parser.add_argument("--save-dir", type=Path, default=Path("runs/solver_sweep"),
                        help="where every trained model is saved (see the module docstring)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.d_model, args.heads, args.layers = 3, [0, 1], 16, 2, 2
        args.context, args.batch, args.val_windows = 16, 4, 8
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = CharData.load(args.data)
    args.vocab_size = len(data.vocab)
    val = validation_windows(data, args)
    args.save_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    jobs = [(seed, run) for seed in args.seeds for run in sweep_runs(args.layers)]
    for seed, run in tqdm(jobs, desc="solver sweep"):
        row, model = train_run(run, seed, data, val, args)
        rows.append(row)
        if model is not None:
            path = args.save_dir / f"{run.arch}_{run.method}_{run.steps or 'adaptive'}_seed{seed}.pt"
            torch.save({"config": config(run, args), "state_dict": model.state_dict(), **row}, path)
        write_csv(rows, args.out.with_suffix(".csv"))  # partial results survive an interruption
    stats = summary(rows)
    front = pareto({n: (s["train_flops_per_token"][0], s["val_loss"][0]) for n, s in stats.items() if s["ok"]})
    plot(stats, front, args.out.with_suffix(".png"))
    write_md(rows, stats, args, data.source, args.out.with_suffix(".md"))
    with open(args.out.with_suffix(".md"), "a") as f:
        f.write(f"Total wall time of this sweep: {time.perf_counter() - start:.0f} s.\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
