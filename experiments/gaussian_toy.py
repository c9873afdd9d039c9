"""The Gaussian SVFlow toy (paper Fig. 1): does a strong consistency regulariser collapse the flow?

Data: a 2-D mixture of isotropic Gaussians (``GaussianMixtureDataModule``). Model:
``GaussianMixtureField`` with ``p(x|z) = N(mu_z, s^2 I)`` (``s`` the data's, fixed; means
learned) and ``q(z|x) = softmax(A x + b)``, trained full-batch to maximise

    mean_x ELBO(x) - beta * mean_x D(x),   D = KL(q(z|x) || p(z|x))  ("qp", default)
                                            or KL(p(z|x) || q(z|x))  ("pq"),

and with ``beta = inf`` on ``D`` alone (the paper's "only the variational consistency objective"),
from means that start near the origin or spread over the classes.
Per beta: the field ``v(x) = sum_z q(z|x) (mu_z - x) / s^2`` over ELBO contours, points
integrated with ``solvers.odeint`` (RK4) to where they converge, and the numbers in the csv.

    python -m experiments.gaussian_toy [--form qp|pq] [--inits origin spread] [--smoke]

writes experiments/results/gaussian_toy.{md,png,csv}.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from solvers import odeint  # noqa: E402
from svflow_ode.fields import GaussianMixtureField  # noqa: E402
from svflow_ode.training.toy import GaussianMixtureDataModule  # noqa: E402

FORMS = {"qp": "KL(q(z|x) || p(z|x))", "pq": "KL(p(z|x) || q(z|x))"}
LIMIT = 4.5  # the plotted square [-LIMIT, LIMIT]^2


def consistency_gap(field: GaussianMixtureField, x: torch.Tensor, form: str) -> torch.Tensor:
    """Per point, the divergence between q(z|x) and the true posterior p(z|x): ``(N,)``."""
    log_q = field.posterior(x).log_softmax(-1)
    log_p = field.log_likelihood(x).log_softmax(-1)  # uniform prior
    if form == "qp":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_evidence(field: GaussianMixtureField, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` of the mixture with a uniform prior: ``(N,)``."""
    ll = field.log_likelihood(x)
    return ll.logsumexp(-1) - math.log(ll.shape[-1])


def initial_means(x: torch.Tensor, labels: torch.Tensor, K: int, init: str, seed: int) -> torch.Tensor:
    """``(K, 2)``: "origin": N(0, 0.5^2) draws; "spread": one training point of each class."""
    generator = torch.Generator().manual_seed(seed)
    if init == "origin":
        return 0.5 * torch.randn(K, 2, generator=generator, dtype=torch.float64)
    picks = [int(torch.randint(int((labels == k).sum()), (1,), generator=generator)) for k in range(K)]
    return torch.stack([x[labels == k][i] for k, i in enumerate(picks)])


def fit(x: torch.Tensor, means: torch.Tensor, sigma: float, beta: float, form: str, steps: int) -> GaussianMixtureField:
    """Train means, A and b from the given means and a uniform q (A = 0, b = 0)."""
    field = GaussianMixtureField(means, sigma).double()
    optimizer = torch.optim.Adam(field.parameters(), lr=0.05)
    for _ in range(steps):
        gap = consistency_gap(field, x, form).mean()
        loss = gap if math.isinf(beta) else -field.elbo(x).mean() + beta * gap
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return field.requires_grad_(False)


def attractors(end: torch.Tensor, tol: float = 0.05) -> list[tuple[torch.Tensor, int]]:
    """Group end points closer than ``tol`` to a group's first member: ``[(point, count)]``."""
    groups: list[list] = []
    for p in end:
        for g in groups:
            if (p - g[0]).norm() < tol:
                g[1] += 1
                break
        else:
            groups.append([p, 1])
    return sorted(((p, n) for p, n in groups), key=lambda g: -g[1])


def alignment(field: GaussianMixtureField, grid: torch.Tensor) -> float:
    """Mean cosine between the field and the ELBO's gradient over the grid points."""
    x = grid.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(field.elbo(x).sum(), x)
    v = field(0.0, grid)
    return float(torch.nn.functional.cosine_similarity(v, grad, dim=-1).mean())


def run(betas, inits, form: str, steps: int, grid_n: int, seed: int):
    data = GaussianMixtureDataModule(n_components=3, radius=2.5, sigma=0.6, n_train=900, n_val=300, seed=seed)
    x, labels = (t.double() if t.is_floating_point() else t for t in data.train_set.tensors)
    K, sigma = len(data.means), data.sigma
    axis = torch.linspace(-LIMIT + 0.5, LIMIT - 0.5, grid_n, dtype=torch.float64)
    starts = torch.cartesian_prod(axis, axis)  # (grid_n^2, 2)
    # Near a merged optimum the flow is slow: 40 time units take every run's points to rest.
    times = torch.linspace(0, 40.0, 81, dtype=torch.float64)
    results = []
    for init, beta in ((i, b) for i in inits for b in betas):
        start_means = initial_means(x, labels, K, init, seed)
        field = fit(x, start_means, sigma, beta, form, steps)
        paths = odeint(field, starts, times, method="rk4", options={"step_size": 0.05})  # (81, N, 2)
        end = paths[-1]
        groups = attractors(end)
        elbo_at = [float(field.elbo(p[None])[0]) for p, _ in groups]
        top = max(range(len(groups)), key=lambda i: elbo_at[i])
        means = field.means.detach()
        results.append({
            "field": field, "paths": paths, "groups": groups, "top": top,
            "row": {
                "init": init, "beta": beta, "form": form,
                "start_min_mean_distance": float(torch.pdist(start_means).min()),
                "elbo": float(field.elbo(x).mean()),
                "log_evidence": float(log_evidence(field, x).mean()),
                "consistency_gap": float(consistency_gap(field, x, form).mean()),
                "min_mean_distance": float(torch.pdist(means).min()),
                "attractors": len(groups),
                "top_attractor_fraction": groups[top][1] / len(end),
                "final_speed_max": float(field(0.0, end).norm(dim=-1).max()),
                "field_elbo_gradient_cosine": alignment(field, starts),
            },
        })
    return x, labels, results


def plot(x, labels, results, form: str, path: Path) -> None:
    inits = list(dict.fromkeys(r["row"]["init"] for r in results))
    n = len(results) // len(inits) + 1
    fig, grid = plt.subplots(len(inits), n, figsize=(3.2 * n, 3.4 * len(inits)), sharex=True, sharey=True,
                             squeeze=False)
    g = torch.linspace(-LIMIT, LIMIT, 120, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    points = torch.stack([X, Y], -1).reshape(-1, 2)
    a = torch.linspace(-LIMIT, LIMIT, 17, dtype=torch.float64)
    QX, QY = torch.meshgrid(a, a, indexing="xy")
    qpoints = torch.stack([QX, QY], -1).reshape(-1, 2)
    for axes, init in zip(grid, inits):
        axes[0].scatter(x[:, 0], x[:, 1], c=labels, s=3, cmap="tab10")
        axes[0].set_title(f"data by class\n(rows: means start '{init}')", fontsize=9)
        for ax, res in zip(axes[1:], [r for r in results if r["row"]["init"] == init]):
            field, row = res["field"], res["row"]
            elbo = field.elbo(points).reshape(X.shape)
            floor = torch.quantile(elbo.flatten(), 0.3)
            ax.contourf(X, Y, elbo.clamp_min(floor), levels=20, cmap="viridis")
            v = field(0.0, qpoints)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            ax.quiver(qpoints[:, 0], qpoints[:, 1], v[:, 0], v[:, 1], color="white", scale=30, width=0.004)
            paths = res["paths"]
            for i in range(0, paths.shape[1], max(1, paths.shape[1] // 40)):
                ax.plot(paths[:, i, 0], paths[:, i, 1], color="black", lw=0.4, alpha=0.6)
            for i, (p, count) in enumerate(res["groups"]):
                ax.plot(p[0], p[1], marker="*", ms=14 if i == res["top"] else 9, color="red", mec="white")
            means = field.means
            ax.plot(means[:, 0], means[:, 1], "x", color="orange", ms=6)
            beta = "∞ (consistency only)" if math.isinf(row["beta"]) else f"{row['beta']:g}"
            ax.set_title(f"β = {beta}: {row['attractors']} attractor(s)", fontsize=9)
    grid[0, 0].set_xlim(-LIMIT, LIMIT)
    grid[0, 0].set_ylim(-LIMIT, LIMIT)
    fig.suptitle(f"Gaussian SVFlow: field (white, unit arrows) over ELBO contours; regulariser β·{FORMS[form]}; "
                 "RK4 paths (black) end at red stars (large: highest ELBO); learned means: orange x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)


def write(results, form: str, steps: int, out: Path, smoke: bool) -> None:
    rows = [r["row"] for r in results]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Gaussian SVFlow toy (paper Fig. 1)" + (" — SMOKE RUN, not a result" if smoke else ""),
        "",
        f"Regulariser form: **β · {FORMS[form]}** (option `--form`), added to the negative mean ELBO; "
        f"β = ∞ trains on the regulariser alone. Trained: means, A, b (Adam, lr 0.05, {steps} full-batch steps, "
        "from A = 0, b = 0, i.e. a uniform q); means start either near the origin ('origin': N(0, 0.5²)) or at one "
        "training point of each class ('spread'); s fixed at the data's 0.6; 3 components, radius 2.5, 900 points. "
        "Points start on a grid and are integrated with `solvers.odeint` (RK4, step 0.05) to t = 40; end points "
        "closer than 0.05 count as one attractor.",
        "",
        "| means start | β | start min ‖μ_i-μ_j‖ | ELBO | log p(x) | consistency gap "
        "| final min ‖μ_i-μ_j‖ "
        "| attractors | share at best | max final speed | cos(v, ∇ELBO) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['init']} | {r['beta']:g} | {r['start_min_mean_distance']:.3f} | {r['elbo']:.4f} | "
            f"{r['log_evidence']:.4f} | {r['consistency_gap']:.2e} | {r['min_mean_distance']:.3f} | "
            f"{r['attractors']} | {r['top_attractor_fraction']:.2f} | {r['final_speed_max']:.1e} | "
            f"{r['field_elbo_gradient_cosine']:.4f} |"
        )
    lines += [
        "",
        "## What the numbers say",
        "",
        "Identity: ELBO(x) = log p(x) - KL(q(z|x) || p(z|x)), so with the qp form the objective is "
        "log p(x) - (1 + β) KL(q||p(z|x)): a finite β only re-weights a term the ELBO already has, and since "
        "softmax(Ax + b) contains the exact posterior of equal isotropic Gaussians, every finite β has the same "
        "optimum (the maximum-likelihood mixture). β = ∞ drops log p(x): any means with q = p(z|x) are optimal, "
        "and nothing pulls the means towards the data.",
        "",
    ]
    for init in dict.fromkeys(r["init"] for r in rows):
        mine = [r for r in rows if r["init"] == init]
        for r in mine:
            beta = "∞" if math.isinf(r["beta"]) else f"{r['beta']:g}"
            verdict = ("all points converge to one optimum (collapse)" if r["attractors"] == 1
                       else f"{r['attractors']} attractors (no collapse)")
            line = (
                f"- means start '{init}', β = {beta}: {verdict}; means {r['start_min_mean_distance']:.2f} → "
                f"{r['min_mean_distance']:.2f} apart (closest pair), log p(x) {r['log_evidence']:.3f}, "
                f"consistency gap {r['consistency_gap']:.1e}, "
                f"cos(field, ∇ELBO) {r['field_elbo_gradient_cosine']:.3f}."
            )
            unregularised = next((u for u in mine if u["beta"] == 0), None)
            if r["attractors"] == 1 and not math.isinf(r["beta"]) and unregularised is not None:
                objective = r["elbo"] - r["beta"] * r["consistency_gap"]
                line += (
                    f" Its objective where training stopped, ELBO - β·gap = {objective:.3f}, is below the "
                    f"{unregularised['log_evidence']:.3f} (= log p(x) of the β = 0 fit) that separated means with "
                    "the exact posterior (gap 0, reachable by softmax(Ax + b)) attain: this collapse is where "
                    "optimisation stopped, not the optimum."
                )
            lines.append(line)
    lines += ["", "![field per beta](gaussian_toy.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", choices=tuple(FORMS), default="qp")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0, 100.0, 1000.0, math.inf])
    parser.add_argument("--inits", nargs="+", choices=("origin", "spread"), default=["origin", "spread"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--grid", type=int, default=12, help="starting points per axis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: checks the pipeline only")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/gaussian_toy"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.betas, args.inits, args.steps, args.grid = [0.0, math.inf], ["spread"], 30, 4
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    x, labels, results = run(args.betas, args.inits, args.form, args.steps, args.grid, args.seed)
    plot(x, labels, results, args.form, args.out.with_suffix(".png"))
    write(results, args.form, args.steps, args.out, args.smoke)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
