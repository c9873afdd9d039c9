"""MoE vs attention: does the variational-consistency regulariser keep a router from collapsing?

Small character SVFlow LMs whose FFN fields are replaced by ``MoEField`` (top-1, unnormalised:
the chosen expert's output is scaled by its router probability, as in Switch), trained with
(i) nothing but cross-entropy, (ii) the Switch load-balancing loss
``alpha * E * sum_e f_e P_e`` (f_e: share of tokens routed to e, P_e: mean router probability),
(iii) the consistency regulariser ``beta * KL(router || experts' likelihood posterior)``
(``svflow_ode.diagnostics.consistency_recorder``, MoE fields only), with gradients into router
and experts, and with p detached (only the router pulled towards it). Measured on a fixed held-out
batch during training: the entropy of the expert load (top-1 shares) per layer, the router's
mean entropy, the consistency gap, and the validation loss.

    python -m experiments.moe_collapse [--steps 600] [--seeds 0 1 2] [--betas 0.01 0.1] [--smoke]

writes experiments/results/moe_collapse.{md,png,csv}.
"""

from __future__ import annotations

import argparse
import csv
import math
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from experiments.char_lm import CharData, train, validation_loss  # noqa: E402
from svflow_ode.diagnostics import consistency_recorder, moe_consistency  # noqa: E402
from svflow_ode.diagnostics.recording import on_calls  # noqa: E402
from svflow_ode.fields import MoEField  # noqa: E402
from svflow_ode.lm import SVFlowLM  # noqa: E402

KINDS = ("none", "switch", "consistency", "consistency_detached")


def moe_lm(vocab_size: int, d_model: int, n_blocks: int, n_experts: int, d_ff: int, context: int) -> SVFlowLM:
    """A post-LN ``SVFlowLM`` whose FFN field in every block is a top-1 ``MoEField``."""
    model = SVFlowLM(vocab_size, d_model, n_heads=4, n_blocks=n_blocks, context=context, norm="post_ln",
                     init="nanogpt")
    for block in model.blocks:
        moe = MoEField(d_model, d_ff, n_experts, top_k=1, renormalise=False)
        for module in moe.modules():  # the LM's own initialisation (nanoGPT's)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        block.terms[1].field = moe
    return model


def moe_fields(model) -> list[MoEField]:
    return [m for m in model.modules() if isinstance(m, MoEField)]


@contextmanager
def recorded_router_probs(model):
    """Yield a list that collects, per router call inside the block, its posterior ``(..., E)``.

    A forward hook on each ``MoEField``'s ``router`` (whose output is the probabilities), so the
    fields themselves store nothing.
    """
    calls = []
    handles = [field.router.register_forward_hook(lambda module, args, probs: calls.append(probs))
               for field in moe_fields(model)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def switch_loss(router_probs, alpha: float) -> torch.Tensor:
    """``alpha * E * sum_e f_e P_e`` averaged over the recorded router calls (one per MoE field
    with Euler: ``recorded_router_probs``)."""
    losses = []
    for probs in router_probs:
        probs = probs.flatten(0, -2)  # (N, E)
        E = probs.shape[-1]
        share = torch.bincount(probs.argmax(-1), minlength=E).to(probs.dtype) / len(probs)  # f_e
        losses.append(E * (share * probs.mean(0)).sum())
    return alpha * torch.stack(losses).mean()


def variant_name(kind: str, weight: float) -> str:
    return {"none": "none", "switch": f"switch α={weight:g}", "consistency": f"consistency β={weight:g}",
            "consistency_detached": f"consistency β={weight:g}, p detached"}[kind]


def forward_for(kind: str, weight: float):
    """The training step's ``forward(model, ids) -> (output, extra loss)`` of a variant."""
    if kind == "none":
        return None
    if kind == "switch":
        def forward(model, ids):
            with recorded_router_probs(model) as router_probs:
                out = model(ids)
            return out, switch_loss(router_probs, weight)
        return forward

    def forward(model, ids):
        with consistency_recorder(model, parts=("moe",), detach_p=kind == "consistency_detached") as kls:
            out = model(ids)
        return out, weight * torch.stack(kls).mean()
    return forward


@torch.no_grad()
def load_statistics(model, ids: torch.Tensor) -> dict:
    """Per MoE layer on ``ids``: load entropy (nats), router entropy, consistency gap, max share."""
    def read(field, x, context):
        probs = field.router(x).flatten(0, -2)  # (N, E): the router outputs the posterior
        share = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).double() / len(probs)
        return {
            "load_entropy": float(-(share * share.clamp_min(1e-12).log()).sum()) + 0.0,  # no -0.0
            "max_share": float(share.max()),
            "router_entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()),
            "consistency_gap": float(moe_consistency(field, x)),
        }

    was_training = model.training
    model.eval()
    with on_calls(model, MoEField, read) as records:
        model(ids)
    model.train(was_training)
    return {f"{name}_l{k}": value for k, (_, stats) in enumerate(records) for name, value in stats.items()}


def run_variant(kind, weight, data, seed, args):
    torch.manual_seed(seed)
    model = moe_lm(len(data.vocab), args.d_model, args.layers, args.experts, args.d_ff, args.context)
    generator = torch.Generator().manual_seed(1234)  # the same held-out windows for every run
    probe_ids = data.windows("val", 32, args.context, generator)
    val_windows = data.windows("val", args.val_windows, args.context + 1, generator)
    history = []

    def probe(model, step):
        row = {"variant": variant_name(kind, weight), "seed": seed, "step": step, **load_statistics(model, probe_ids)}
        if step % args.val_every == 0 or step == args.steps:
            row["val_loss"] = validation_loss(model, val_windows)
        history.append(row)

    train(model, data, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=seed,
          forward=forward_for(kind, weight), probe=probe, probe_every=args.probe_every,
          desc=f"{variant_name(kind, weight)} seed {seed}")
    return history


def plot(history, variants, layers, n_experts, path: Path) -> None:
    """Per variant: mean over seeds (line) and the seeds' range (band) of each quantity."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = dict(zip(variants, ("tab:red", "tab:blue", "tab:green", "tab:olive", "tab:purple", "tab:brown")))

    def lowest_entropy(r):
        return min(r[f"load_entropy_l{k}"] for k in range(layers))

    def mean_gap(r):
        return sum(r[f"consistency_gap_l{k}"] for k in range(layers)) / layers

    quantities = [(axes[0], lowest_entropy, lambda r: True), (axes[1], mean_gap, lambda r: True),
                  (axes[2], lambda r: r["val_loss"], lambda r: "val_loss" in r)]
    for variant in variants:
        rows = [r for r in history if r["variant"] == variant]
        for ax, value, keep in quantities:
            steps = sorted({r["step"] for r in rows if keep(r)})
            values = [[value(r) for r in rows if r["step"] == step and keep(r)] for step in steps]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(steps, mean, color=colours[variant], lw=1.2, label=variant)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colours[variant],
                            alpha=0.15, lw=0)
    axes[0].axhline(math.log(n_experts), color="grey", lw=0.8)
    axes[0].axhline(0.5 * math.log(n_experts), color="grey", lw=0.8, ls=":")
    axes[0].set(title=f"lowest layer load entropy (nats; max {math.log(n_experts):.3f},\ndotted: collapse threshold)",
                xlabel="step")
    axes[1].set(title="KL(router || experts' likelihood posterior)", xlabel="step", yscale="log")
    axes[2].set(title="validation loss (nats/char)", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.suptitle("mean over seeds (line) and range over seeds (band)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collapsed_seeds(final_rows, L: int, E: int) -> int:
    """How many runs end with a layer whose load entropy is below half the maximum, log(E) / 2."""
    return sum(any(r[f"load_entropy_l{k}"] < 0.5 * math.log(E) for k in range(L)) for r in final_rows)


def summarise(history, variants, args, data_source, smoke: bool) -> str:
    L, E = args.layers, args.experts
    final = [r for r in history if r["step"] == args.steps]
    lines = [
        "# MoE router collapse: no balancing vs Switch loss vs variational consistency"
        + (" — SMOKE RUN, not a result" if smoke else ""),
        "",
        f"Data: {data_source}. Model: post-LN SVFlowLM, d = {args.d_model}, {L} layers, 4 heads, context "
        f"{args.context}; every FFN field replaced by a MoEField with {E} experts (width {args.d_ff}), top-1, "
        f"unnormalised weights. AdamW lr {args.lr}, batch {args.batch}, {args.steps} steps, seeds {args.seeds}. "
        "Switch: α·E·Σ_e f_e P_e. Consistency: β·KL(router q(e|x) || p(e|x)) with p(e|x) ∝ C_d(|f_e(x)|) "
        "exp(f_e(x)·x̂) (vMF normaliser included, every expert evaluated densely, uniform prior), MoE fields "
        "only, gradients into router and experts unless 'p detached' (router only). Statistics on 32 fixed "
        "held-out windows; load entropy = "
        f"entropy of the top-1 token shares (nats, max log {E} = {math.log(E):.3f}); 'collapsed' = a layer whose "
        "final load entropy is below half the maximum.",
        "",
        "| variant | seed | final load entropy per layer | min during training | final max share per layer "
        "| final consistency gap | final val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    def per_layer(values, digits):
        return ", ".join(f"{v:.{digits}f}" for v in values)

    for r in sorted(final, key=lambda r: (variants.index(r["variant"]), r["seed"])):
        every = [h for h in history if h["variant"] == r["variant"] and h["seed"] == r["seed"]]
        entropy = [r[f"load_entropy_l{k}"] for k in range(L)]
        lowest = [min(h[f"load_entropy_l{k}"] for h in every) for k in range(L)]
        share = [r[f"max_share_l{k}"] for k in range(L)]
        gap = sum(r[f"consistency_gap_l{k}"] for k in range(L)) / L
        lines.append(
            f"| {r['variant']} | {r['seed']} | {per_layer(entropy, 3)} | {per_layer(lowest, 3)} "
            f"| {per_layer(share, 2)} | {gap:.3f} | {r['val_loss']:.4f} |"
        )
    lines += ["", "## Verdict (computed from the table)", ""]
    for variant in variants:
        mine = [r for r in final if r["variant"] == variant]
        collapsed = collapsed_seeds(mine, L, E)
        lowest = min(r[f"load_entropy_l{k}"] for r in mine for k in range(L))
        during = min(h[f"load_entropy_l{k}"] for h in history if h["variant"] == variant for k in range(L))
        gap = sum(r[f"consistency_gap_l{k}"] for r in mine for k in range(L)) / (L * len(mine))
        val = sum(r["val_loss"] for r in mine) / len(mine)
        lines.append(
            f"- {variant}: {collapsed} of {len(mine)} seeds end with a collapsed layer; lowest final layer load "
            f"entropy {lowest:.3f} nats (lowest at any probe during training {during:.3f}); mean consistency gap "
            f"{gap:.3f}; mean val loss {val:.4f}."
        )
    baseline = [r for r in final if r["variant"] == "none"]
    for variant in (v for v in variants if v.startswith("consistency")):
        mine = [r for r in final if r["variant"] == variant]
        collapsed = collapsed_seeds(mine, L, E)
        lines.append(
            f"- Does {variant} prevent collapse (rule: no seed ends with a collapsed layer, while "
            f"{collapsed_seeds(baseline, L, E)} of {len(baseline)} unregularised seeds do)? "
            f"**{'yes' if collapsed == 0 else 'no'}** ({collapsed} of {len(mine)})."
        )
    lines += ["", "![load entropy, consistency gap and validation loss](moe_collapse.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.01, help="Switch loss weight")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.1], help="consistency regulariser weights")
    parser.add_argument("--detached-betas", type=float, nargs="*", default=[0.1],
                        help="consistency weights with p detached (router-only gradients)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--probe-every", type=int, default=25)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-windows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: checks the pipeline only")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/moe_collapse"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.betas, args.detached_betas = 4, [0], [0.01], []
        args.d_model, args.d_ff, args.context, args.batch = 32, 32, 16, 8
        args.probe_every, args.val_every, args.val_windows = 2, 2, 8
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = CharData.load()
    runs = [("none", 0.0), ("switch", args.alpha)] + [("consistency", beta) for beta in args.betas]
    runs += [("consistency_detached", beta) for beta in args.detached_betas]
    variants = [variant_name(kind, weight) for kind, weight in runs]
    history = [row for seed in args.seeds for kind, weight in runs
               for row in run_variant(kind, weight, data, seed, args)]
    keys = sorted({k for r in history for k in r}, key=lambda k: (k not in ("variant", "seed", "step"), k))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    plot(history, variants, args.layers, args.experts, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(summarise(history, variants, args, data.source, args.smoke))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
