"""MoE vs attention: does the variational-consistency regulariser keep a router from collapsing?

Small character SVFlow LMs on Tiny Shakespeare whose FFN fields are replaced by ``MoEField``
(``MoELM``: top-1, unnormalised: the chosen expert's output is scaled by its router probability,
as in Switch), each trained by ``svflow-ode fit`` (``experiments.fit``) with (i) nothing but
cross-entropy, (ii) the Switch load-balancing loss ``alpha * E * sum_e f_e P_e`` (f_e: share of
tokens routed to e, P_e: mean router probability; ``MoELM(switch_alpha=...)``), (iii) the
consistency regulariser ``beta * KL(router || experts' likelihood posterior)`` (``LitSVFlow``'s
``consistency_beta`` on the MoE fields), with gradients into router and experts, and with p
detached (only the router pulled towards it). Measured on a fixed held-out batch during training
(``LoadProbe``): the entropy of the expert load (top-1 shares) per layer, the router's mean
entropy and the consistency gap; and the validation loss ``LitSVFlow`` logs.

    python -m experiments.moe_collapse [--steps 600] [--seeds 0 1 2] [--betas 0.01 0.1] [--smoke]

writes experiments/results/moe_collapse.{md,png,csv}; each run's logs and checkpoint go to
``--runs``/<variant>_seed<seed>.
"""

from __future__ import annotations

import argparse
import csv
import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from experiments.fit import fit  # noqa: E402
from experiments.report import write_csv  # noqa: E402
from svflow_ode.diagnostics import moe_consistency  # noqa: E402
from svflow_ode.diagnostics.recording import on_calls  # noqa: E402
from svflow_ode.fields import MoEField  # noqa: E402
from svflow_ode.lm import SVFlowLM  # noqa: E402
from svflow_ode.training.data import seeded_generator  # noqa: E402

# The CLI builds the model and the probe from their import paths: this module's, however it was started.
MODULE = "experiments.moe_collapse"


class MoELM(SVFlowLM):
    """An ``SVFlowLM`` whose FFN field in every block is a top-1, unnormalised ``MoEField``.

    Args:
        vocab_size: vocabulary size.
        n_experts: experts per MoE field, each as wide as the FFN it replaces (``d_ff``).
        switch_alpha: weight of the Switch load-balancing loss ``alpha * E * sum_e f_e P_e``,
            averaged over the forward pass's router calls (0: none). ``LitSVFlow`` optimises the
            cross-entropy only, so the loss enters as its gradient: in training mode each router
            call's probabilities receive ``alpha * E * f_e / (calls * tokens)`` on top of theirs
            (the top-1 shares f_e are counts, constant to autograd, as in Switch).
        **kwargs: ``SVFlowLM``'s other arguments.
    """

    def __init__(self, vocab_size: int, n_experts: int = 4, switch_alpha: float = 0.0, **kwargs):
        super().__init__(vocab_size, **kwargs)
        if switch_alpha < 0:
            raise ValueError(f"switch_alpha must be >= 0, got {switch_alpha}")
        self.switch_alpha = switch_alpha
        for block in self.blocks:
            ffn = block.terms[1].field
            moe = MoEField(ffn.up.in_features, ffn.up.out_features, n_experts, top_k=1, renormalise=False)
            for module in moe.modules():  # nanoGPT's initialisation, as the LM's other layers
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            block.terms[1].field = moe

    def forward(self, *args, **kwargs):
        if not (self.training and self.switch_alpha):
            return super().forward(*args, **kwargs)
        with recorded_router_probs(self) as calls:
            out = super().forward(*args, **kwargs)
        for probs in calls:
            flat = probs.detach().flatten(0, -2)  # (N, E)
            share = torch.bincount(flat.argmax(-1), minlength=flat.shape[-1]).to(flat.dtype) / len(flat)  # f_e
            push = self.switch_alpha * flat.shape[-1] * share / (len(calls) * len(flat))
            probs.register_hook(partial(torch.add, other=push))
        return out


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


def variant_name(kind: str, weight: float) -> str:
    return {"none": "none", "switch": f"switch α={weight:g}", "consistency": f"consistency β={weight:g}",
            "consistency_detached": f"consistency β={weight:g}, p detached"}[kind]


def variant_overrides(kind: str, weight: float) -> dict:
    """The fit's overrides that turn a variant's balancing term on."""
    if kind == "none":
        return {}
    if kind == "switch":
        return {"model.model.init_args.switch_alpha": weight}
    return {"model.consistency_beta": weight, "model.consistency_parts": ["moe"],
            "model.consistency_detach_p": kind == "consistency_detached"}


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


class LoadProbe(L.Callback):
    """``load_statistics`` on fixed held-out windows before every ``every``-th step and after the last.

    The windows: ``windows`` validation sequences the data module draws with a fixed generator
    (the same for every run). The rows (``step`` and the statistics) go to ``probes.csv`` in the
    trainer's log directory when training ends.
    """

    def __init__(self, every: int = 25, windows: int = 32):
        self.every, self.windows = every, windows

    def on_fit_start(self, trainer, pl_module):
        self.ids = trainer.datamodule.draw(self.windows, seeded_generator(1234), "val")[0]
        self.rows = []

    def probe(self, trainer, pl_module):
        self.rows.append({"step": trainer.global_step, **load_statistics(pl_module.model, self.ids)})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.probe(trainer, pl_module)
        write_csv(Path(trainer.log_dir) / "probes.csv", self.rows)


def run_variant(kind, weight, seed, args) -> list[dict]:
    """Fit one variant from ``seed``; its probe rows, with ``val_loss`` where the fit validated."""
    directory = args.runs / f"{kind}_{weight:g}_seed{seed}"
    fit(directory, {
        "seed_everything": seed,
        "model.model.class_path": f"{MODULE}.MoELM",
        "model.model.init_args.norm": "post_ln",
        "model.model.init_args.init": "nanogpt",
        "model.model.init_args.d_model": args.d_model,
        "model.model.init_args.n_heads": 4,
        "model.model.init_args.n_blocks": args.layers,
        "model.model.init_args.d_ff": args.d_ff,
        "model.model.init_args.n_experts": args.experts,
        "model.lr": args.lr,
        "model.min_lr": args.lr / 10,
        "model.betas": [0.9, 0.95],
        "model.warmup_steps": max(1, args.steps // 20),
        "data.init_args.context": args.context,
        "data.init_args.batch_size": args.batch,
        "data.init_args.val_size": args.val_windows,
        "trainer.max_steps": args.steps,
        "trainer.val_check_interval": args.val_every,
        "trainer.callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            {"class_path": f"{MODULE}.LoadProbe", "init_args": {"every": args.probe_every}},
        ],
        **variant_overrides(kind, weight),
    })
    with open(directory / "metrics.csv", newline="") as f:  # a validation's step column is the step before it
        val = {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}
    with open(directory / "probes.csv", newline="") as f:
        probes = [{key: int(value) if key == "step" else float(value) for key, value in r.items()}
                  for r in csv.DictReader(f)]
    return [{"variant": variant_name(kind, weight), "seed": seed, **r,
             **({"val_loss": val[r["step"]]} if r["step"] in val else {})} for r in probes]


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


def summarise(history, variants, args, smoke: bool) -> str:
    L, E = args.layers, args.experts
    final = [r for r in history if r["step"] == args.steps]
    lines = [
        "# MoE router collapse: no balancing vs Switch loss vs variational consistency"
        + (" — SMOKE RUN, not a result" if smoke else ""),
        "",
        f"Data: Tiny Shakespeare. Model: post-LN SVFlowLM, d = {args.d_model}, {L} layers, 4 heads, context "
        f"{args.context}; every FFN field replaced by a MoEField with {E} experts (width {args.d_ff}), top-1, "
        f"unnormalised weights. Trained by `svflow-ode fit` (runs in `{args.runs}`): AdamW lr {args.lr} with 5% "
        f"warm-up and cosine decay to lr/10, gradients clipped at 1, batch {args.batch}, {args.steps} steps, seeds "
        f"{args.seeds} (a seed sets the initial weights; every run sees the same batches). Validation loss on "
        f"{args.val_windows} fixed windows every {args.val_every} steps. "
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
    parser.add_argument("--runs", type=Path, help="the fits' run directories (default runs/moe_collapse, "
                        "with --smoke runs/moe_collapse_smoke)")
    args = parser.parse_args(argv)
    args.runs = args.runs or Path("runs/moe_collapse" + ("_smoke" if args.smoke else ""))
    if args.smoke:
        args.steps, args.seeds, args.betas, args.detached_betas = 4, [0], [0.01], []
        args.d_model, args.d_ff, args.context, args.batch = 32, 32, 16, 8
        args.probe_every, args.val_every, args.val_windows = 2, 2, 8
    if args.steps % args.val_every:  # the verdict reads the validation loss after the last step
        parser.error(f"--steps ({args.steps}) must be a multiple of --val-every ({args.val_every})")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [("none", 0.0), ("switch", args.alpha)] + [("consistency", beta) for beta in args.betas]
    runs += [("consistency_detached", beta) for beta in args.detached_betas]
    variants = [variant_name(kind, weight) for kind, weight in runs]
    history = [row for seed in args.seeds for kind, weight in runs
               for row in run_variant(kind, weight, seed, args)]
    keys = sorted({k for r in history for k in r}, key=lambda k: (k not in ("variant", "seed", "step"), k))
    write_csv(args.out.with_suffix(".csv"), history, keys)
    plot(history, variants, args.layers, args.experts, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(summarise(history, variants, args, args.smoke))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
