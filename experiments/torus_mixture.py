"""Riemannian flow matching on the flat torus: a mixture of von Mises products, learned density vs the known one.

The torus ``T^2`` is ``geoopt.ProductManifold`` of two unit circles (points ``(cos a1, sin a1,
cos a2, sin a2)``); the target is a ``manifolds.Mixture`` of four ``manifolds.Product``s of von
Mises distributions (``VonMisesFisher`` on ``S^1``), one of them across the seam at ``a = pi``, so
its density is known exactly. A small tangent MLP is trained by flow matching
(``solvers.FlowMatching``: geodesic paths, straight lines in the angles, from the uniform base) on
fresh samples of the target, for several seeds, and evaluated as a CNF (``solvers.CNF``: rk4,
exact divergence, float64):

- the held-out negative log-likelihood on one fixed held-out set, against the target's entropy,
  which no model beats on average: computed exactly here (the periodic trapezoid rule on an angle
  grid converges spectrally for this smooth density), and the paired gap to the target's own NLL
  on the same points (an estimate of KL(target || flow) whose sampling noise largely cancels);
- the same KL by quadrature over the angle grid, and the learned density's total mass there;
- the learned density next to the target's as heat maps over the angle pair.

Writes ``torus_mixture.{md,csv,png}`` to ``--out``. One CPU thread:

    python -m experiments.torus_mixture [--smoke] [--out experiments/results/torus_mixture]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

import manifolds
from solvers import FlowMatching

F64 = torch.float64

# The target's components: mean angles (a1, a2) in radians, concentrations (k1, k2), weight.
COMPONENTS = [
    ((-2.0, -1.6), (6.0, 3.0), 0.30),
    ((0.4, 1.2), (2.0, 10.0), 0.25),
    ((1.8, -1.0), (8.0, 8.0), 0.25),
    ((3.0, 2.8), (4.0, 6.0), 0.20),  # across the seam at +-pi in both angles: it wraps to the corners
]


@dataclass
class Config:
    iters: int = 20000  # Adam steps per seed
    batch: int = 512
    hidden: int = 128
    layers: int = 3
    lr: float = 3e-3  # cosine-decayed to lr / 30
    seeds: tuple = (0, 1, 2)  # each: the network's initialisation and its training draws
    n_test: int = 4000  # held-out points for the NLL (one set, the same for every seed)
    steps: int = 20  # rk4 steps of the CNF
    grid: int = 96  # angles per axis of the quadrature and plot grid
    entropy_grid: int = 512  # angles per axis of the target entropy's quadrature (checked against half)


SMOKE = Config(iters=40, batch=128, hidden=32, layers=2, seeds=(0, 1), n_test=200, steps=4, grid=16, entropy_grid=128)


def circle(angles: torch.Tensor) -> torch.Tensor:
    """Points ``(cos a, sin a)`` of the unit circle."""
    return torch.stack([angles.cos(), angles.sin()], -1)


def to_torus(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """The torus points of angle pairs: ``(cos a1, sin a1, cos a2, sin a2)``."""
    return torch.cat([circle(a1), circle(a2)], -1)


def target_distribution() -> manifolds.Mixture:
    """The mixture of ``COMPONENTS``: each a product of von Mises distributions on the two circles."""
    def von_mises(angle, kappa):
        return manifolds.VonMisesFisher(circle(torch.tensor(angle, dtype=F64)), kappa)

    parts = [manifolds.Product([von_mises(a, k) for a, k in zip(means, kappas)]) for means, kappas, _ in COMPONENTS]
    return manifolds.Mixture(parts, [w for *_, w in COMPONENTS])


def uniform_torus() -> manifolds.Product:
    """The uniform distribution on the torus (density ``1 / (2 pi)^2``): the flow's base."""
    return manifolds.Product([manifolds.UniformSphere(2), manifolds.UniformSphere(2)])


class TorusMLP(nn.Module):
    """A field ``(t, x) -> proju(x, MLP([x, t, sin/cos(2 pi k t)]))`` on the torus (as ``TangentMLP`` on S^2).

    The inputs are the point's four coordinates (periodic in the angles by construction) and the
    time features; the output, projected onto the tangent space, moves each angle.
    """

    def __init__(self, manifold, hidden: int, layers: int, time_frequencies: int = 4):
        super().__init__()
        self.manifold = manifold
        widths = [4 + 1 + 2 * time_frequencies, *[hidden] * layers]
        blocks = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, 4))
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(1, time_frequencies + 1), persistent=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])[..., None]  # scalar or per point
        angles = t * self.frequencies.to(x)
        return self.manifold.proju(x, self.net(torch.cat([x, t, angles.sin(), angles.cos()], -1)))


def angle_grid(n: int):
    """``(angles, points, weight)``: cell centres of an ``n x n`` grid over ``[-pi, pi)^2`` (``a1`` first),
    the torus points there, and the trapezoid weight ``(2 pi / n)^2`` of each."""
    a = (torch.arange(n, dtype=F64) + 0.5) * 2 * math.pi / n - math.pi
    a1, a2 = torch.meshgrid(a, a, indexing="ij")
    return a, to_torus(a1.reshape(-1), a2.reshape(-1)), (2 * math.pi / n) ** 2


def target_entropy(target, n: int) -> tuple[float, float]:
    """``(H, |H - H_half|)``: the target's entropy by the trapezoid rule on an ``n x n`` grid, and its change
    from the ``n/2`` grid (spectral convergence: the error is far below that change)."""
    def at(m):
        _, points, weight = angle_grid(m)
        logp = target.log_prob(points)
        return -(logp.exp() * logp).sum().item() * weight

    fine = at(n)
    return fine, abs(fine - at(n // 2))


def train_and_evaluate(cfg: Config, seed: int, target, test: torch.Tensor) -> dict:
    """One seed: train by flow matching, then the held-out NLL, the KL by quadrature and the grid density."""
    base = uniform_torus()
    torch.manual_seed(seed)
    fm = FlowMatching(TorusMLP(base.manifold, cfg.hidden, cfg.layers), base.manifold, base)
    g = torch.Generator().manual_seed(1000 + seed)  # the training draws; the held-out set's stream is apart
    optimizer = torch.optim.Adam(fm.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.iters, eta_min=cfg.lr / 30)
    losses, wall, cpu = [], time.perf_counter(), time.process_time()
    for _ in range(cfg.iters):
        loss = fm.loss(target.sample(cfg.batch, dtype=torch.float32, generator=g), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    evaluation = time.process_time()
    cnf = fm.double().cnf(options={"steps": cfg.steps})
    with torch.no_grad():
        nll = -cnf.log_prob(test)
    gap = nll + target.log_prob(test)  # flow's NLL minus the target's, point by point
    _, points, weight = angle_grid(cfg.grid)
    with torch.no_grad():
        logq = cnf.log_prob(points)
    logp = target.log_prob(points)
    n = len(test)
    return {
        "seed": seed, "losses": losses, "train_wall_seconds": wall, "train_cpu_seconds": cpu,
        "eval_cpu_seconds": time.process_time() - evaluation,
        "nll": nll.mean().item(), "nll_se": nll.std().item() / math.sqrt(n),
        "gap": gap.mean().item(), "gap_se": gap.std().item() / math.sqrt(n),
        "kl_quadrature": (logp.exp() * (logp - logq)).sum().item() * weight,
        "mass": logq.exp().sum().item() * weight,
        "learned": logq.exp().reshape(cfg.grid, cfg.grid),
    }


def run(cfg: Config) -> dict:
    target = target_distribution()
    test = target.sample(cfg.n_test, dtype=F64, generator=torch.Generator().manual_seed(7))
    reference = -target.log_prob(test)  # the target's own NLL on the held-out points
    entropy, entropy_change = target_entropy(target, cfg.entropy_grid)
    seeds = [train_and_evaluate(cfg, s, target, test) for s in cfg.seeds]
    angles, points, _ = angle_grid(cfg.grid)

    def across(key):  # mean over the seeds and its standard error (0 for one seed)
        values = torch.tensor([r[key] for r in seeds], dtype=F64)
        return values.mean().item(), (values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0)

    return {
        "config": cfg, "seeds": seeds, "entropy": entropy, "entropy_change": entropy_change,
        "target_nll": reference.mean().item(), "target_nll_se": reference.std().item() / math.sqrt(len(reference)),
        "uniform_nll": 2 * math.log(2 * math.pi),
        "nll": across("nll"), "gap": across("gap"), "kl_quadrature": across("kl_quadrature"),
        "angles": angles, "target": target.log_prob(points).exp().reshape(cfg.grid, cfg.grid),
    }


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    first = result["seeds"][0]
    fig = Figure(figsize=(19, 4.2), layout="constrained")
    extent = [-math.pi, math.pi, -math.pi, math.pi]
    top = max(result["target"].max().item(), first["learned"].max().item())
    # imshow's rows are the vertical axis: a2, so the [a1, a2] grids are transposed.
    for i, (image, title) in enumerate([(result["target"], "target density"),
                                        (first["learned"], f"learned density (CNF, seed {first['seed']})")]):
        ax = fig.add_subplot(1, 4, i + 1)
        shown = ax.imshow(image.T.numpy(), origin="lower", extent=extent, vmin=0, vmax=top, cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("angle 1 (rad)")
        ax.set_ylabel("angle 2 (rad)")
    fig.colorbar(shown, ax=fig.axes[:2], fraction=0.03, label="density (per rad^2)")
    ax = fig.add_subplot(1, 4, 3)
    difference = first["learned"] - result["target"]
    span = difference.abs().max().item() or 1.0
    shown = ax.imshow(difference.T.numpy(), origin="lower", extent=extent, vmin=-span, vmax=span, cmap="RdBu_r")
    ax.set_title("learned minus target")
    ax.set_xlabel("angle 1 (rad)")
    fig.colorbar(shown, ax=ax, fraction=0.05)
    ax = fig.add_subplot(1, 4, 4)
    for i, seed in enumerate(result["seeds"]):
        losses = torch.tensor(seed["losses"])
        window = max(1, len(losses) // 100)
        ax.plot(range(window - 1, len(losses)), losses.unfold(0, window, 1).mean(-1), color=f"C{i}",
                label=f"seed {seed['seed']} (mean of {window})")
    ax.legend()
    ax.locator_params(axis="x", nbins=5)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("training")
    fig.savefig(path, dpi=110)


def write(result: dict, out: Path, command: str, smoke: bool) -> None:
    cfg = result["config"]
    fields = ["seed", "held_out_nll", "held_out_nll_se", "gap", "gap_se", "kl_quadrature", "learned_mass",
              "target_nll_same_points", "target_entropy_quadrature", "train_cpu_seconds", "train_wall_seconds",
              "eval_cpu_seconds", "final_loss_mean_last_100"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in result["seeds"]:
            last = r["losses"][-100:]
            writer.writerow([r["seed"]] + [f"{v:.6g}" for v in (
                r["nll"], r["nll_se"], r["gap"], r["gap_se"], r["kl_quadrature"], r["mass"], result["target_nll"],
                result["entropy"], r["train_cpu_seconds"], r["train_wall_seconds"], r["eval_cpu_seconds"],
                sum(last) / len(last))])
    per_seed = "\n".join(
        f"| {r['seed']} | {r['nll']:.4f} ± {r['nll_se']:.4f} | {r['gap']:.4f} ± {r['gap_se']:.4f} | "
        f"{r['kl_quadrature']:.4f} | {r['mass']:.5f} | {r['train_cpu_seconds']:.0f} | {r['eval_cpu_seconds']:.0f} |"
        for r in result["seeds"])
    (nll, nll_se), (gap, gap_se), (kl, kl_se) = result["nll"], result["gap"], result["kl_quadrature"]
    k = len(result["seeds"])
    components = "; ".join(f"angles ({a[0]}, {a[1]}), kappa ({c[0]:g}, {c[1]:g}), weight {w}" for a, c, w in COMPONENTS)
    cpu = sum(r["train_cpu_seconds"] for r in result["seeds"])
    verdict = "within" if abs(nll - result["entropy"]) <= 0.05 else "NOT within"

    def point_se(key):  # a per-seed standard error over the held-out points, averaged over the seeds
        return sum(r[key] for r in result["seeds"]) / k

    spread = "mostly" if point_se("gap_se") < point_se("nll_se") / 2 else "not mostly"
    out.with_suffix(".md").write_text(
        ("**SMOKE RUN** (tiny settings: the numbers mean nothing)\n\n" if smoke else "")
        + "# Riemannian flow matching on the flat torus: a mixture of products of von Mises distributions\n\n"
        f"Generated by `{command}` (one CPU thread of a shared 2-core machine; training {cpu:.0f} s of CPU time "
        f"for {k} seeds, evaluation {sum(r['eval_cpu_seconds'] for r in result['seeds']):.0f} s).\n\n"
        "Torus: `geoopt.ProductManifold` of two unit circles, points `(cos a1, sin a1, cos a2, sin a2)`, "
        "densities per unit area in the angles. "
        f"Target: a `manifolds.Mixture` of `manifolds.Product`s of two von Mises distributions: {components} "
        "(the last wraps across the seam at ±π in both angles). "
        "Model: a tangent MLP trained by `solvers.FlowMatching` (geodesic paths from the uniform base) on fresh "
        f"target samples, {cfg.iters} Adam steps per seed; likelihood by `solvers.CNF` (rk4, {cfg.steps} steps, "
        f"exact divergence, float64) on one held-out set of {cfg.n_test} points, the same for every seed.\n\n"
        f"| quantity | nats |\n|---|---|\n"
        f"| held-out NLL of the flow, mean over {k} seeds (± SE over seeds) | {nll:.4f} ± {nll_se:.4f} |\n"
        f"| target's entropy (exact: quadrature on a {cfg.entropy_grid}² grid, "
        f"changes by {result['entropy_change']:.1e} from half of it) | {result['entropy']:.4f} |\n"
        f"| target's NLL on the same held-out points (± SE over the points) | "
        f"{result['target_nll']:.4f} ± {result['target_nll_se']:.4f} |\n"
        f"| gap: flow minus target on the same points (estimates KL(target ‖ flow)), mean over seeds | "
        f"{gap:.4f} ± {gap_se:.4f} |\n"
        f"| KL(target ‖ flow) by quadrature on the {cfg.grid}² grid, mean over seeds | {kl:.4f} ± {kl_se:.4f} |\n"
        f"| uniform density on the torus, for scale | {result['uniform_nll']:.4f} |\n\n"
        f"Held-out NLL is {verdict} 0.05 nats of the target's entropy (difference {nll - result['entropy']:+.4f}; "
        f"the bar the issue sets for the S^2 example). Its standard error over the held-out points is "
        f"{point_se('nll_se'):.4f} per seed, {spread} the target's own spread of log-densities (the target's NLL on "
        f"the same points is {result['target_nll'] - result['entropy']:+.4f} from its entropy). Paired on the same "
        f"points that spread cancels: the flow is {gap:.4f} nats above the target (± {gap_se:.4f} over seeds, "
        f"± {point_se('gap_se'):.4f} over the points per seed), an estimate of KL(target ‖ flow) that the quadrature "
        f"over the grid, free of sampling noise, puts at {kl:.4f}.\n\n"
        "| seed | held-out NLL ± SE (points) | gap ± SE (points) | KL by quadrature | learned mass on the grid | "
        f"training CPU s | evaluation CPU s |\n|---|---|---|---|---|---|---|\n{per_seed}\n\n"
        "The learned mass is the CNF density summed over the grid (1 up to rk4's and the grid's errors).\n\n"
        f"![target vs learned density]({out.with_suffix('.png').name})\n\n"
        "| setting | value |\n|---|---|\n" + "\n".join(f"| `{key}` | {v} |" for key, v in asdict(cfg).items()) + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a run of seconds (the numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/torus_mixture"))
    parser.add_argument("--iters", type=int, help="override the Adam steps per seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SMOKE if args.smoke else Config()
    if args.iters is not None:
        cfg = replace(cfg, iters=args.iters)
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    result = run(cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, args.out.with_suffix(".png"))
    command = "python -m experiments.torus_mixture" + (" --smoke" if args.smoke else "")
    write(result, args.out, command, args.smoke)
    (nll, nll_se), (gap, gap_se) = result["nll"], result["gap"]
    print(f"held-out NLL {nll:.4f} ± {nll_se:.4f} (over seeds), target entropy {result['entropy']:.4f}, "
          f"gap on the same points {gap:.4f} ± {gap_se:.4f}")
    return result


if __name__ == "__main__":
    main()
