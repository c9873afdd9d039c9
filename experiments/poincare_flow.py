"""Learn a flow on the Poincaré disk from trajectories: on the ball (geoopt) vs in plain R^2.

Ground truth: the hyperbolic gradient flow of ``d(x, c)^2 / 2`` towards a point ``c`` of the unit
Poincaré disk (curvature -1), ``dx/dt = log_x(c)``. It runs along the geodesic from ``x0`` to ``c``
with ``d(x(t), c) = d(x0, c) e^{-t}``, in closed form

    x(t) = exp_{x0}((1 - e^{-t}) log_{x0}(c)),

which the script checks against a float64 dopri5 solve at rtol 1e-12 before using it. Start points
are spread over the disk, a share of them within a few hundredths of the boundary, where the
field is small in coordinates (``|log_x(c)| = d(x, c) (1 - |x|^2) / 2``) and a coordinate error of
a few hundredths is a large hyperbolic one.

Model: one MLP ``R^2 -> R^2``. The *same* architecture and the *same* initial weights are trained
twice with the same data, optimiser and rk4 steps:

- ball: ``solvers.odeint(..., method="rk4", manifold=geoopt.PoincareBall())``;
- Euclidean: ``solvers.odeint(..., method="rk4", manifold=None)``.

On the Poincaré ball every vector is tangent (``proju`` is the identity) and geoopt's ``retr`` is
``x + u`` followed by clipping to the radius ``1 - 4e-3`` (float32): the two solves agree to the
last bit until a state reaches that radius. What the manifold changes is what happens there:
the ball solve pins the state at the clip radius (and ``boundary="raise"``, the default, would stop
with ``BoundaryError``; here ``boundary="warn"`` goes on), while the Euclidean state leaves the disk,
where the hyperbolic distance is undefined.

Evaluation on held-out start points over 3x the training horizon: hyperbolic-distance error to the
truth, the fraction of states outside the disk and the norm excess ``max(|x| - 1, 0)`` (Euclidean),
the fraction pinned at the clip radius (ball).

Writes ``poincare_flow.{md,csv,png}`` to ``--out``.

    python -m experiments.poincare_flow [--smoke] [--out experiments/results]
"""

from __future__ import annotations

import copy
import csv
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import geoopt
import torch
from torch import nn

import solvers

from . import worked_example
from .worked_example import MLPField

BALL = geoopt.PoincareBall()
NAME = "poincare_flow"
SOLVES = ("ball", "euclidean")
TARGET = (0.3, -0.2)  # the point c the flow contracts to


@dataclass
class Config:
    n_train: int = 64  # observed trajectories
    n_test: int = 64  # held-out trajectories (new start points)
    edge_share: float = 0.25  # share of start points drawn with |x0| in [edge_min, edge_max]
    edge_min: float = 0.95
    edge_max: float = 0.99
    n_obs: int = 11  # observation times per trajectory, evenly spaced on [0, horizon]
    horizon: float = 1.0  # training time span
    extrapolate: int = 3  # evaluate on [0, extrapolate * horizon]
    backward: float = 0.5  # and backwards in time on [-backward, 0], towards the boundary
    noise: float = 0.005  # std of the Gaussian noise on observed coordinates (kept inside the disk)
    hidden: int = 64  # width of the MLP's two hidden layers
    steps: int = 2  # rk4 steps per observation interval
    iters: int = 800  # Adam iterations (full batch), per model
    lr: float = 5e-3  # Adam learning rate (cosine-decayed to 0)
    seed: int = 0


SMOKE = Config(n_train=16, n_test=16, n_obs=6, hidden=16, iters=15)


def start_points(n: int, cfg: Config, dtype=torch.float64) -> torch.Tensor:
    """``n`` start points: uniform over the disk of radius ``edge_min``, a share near the boundary."""
    n_edge = round(cfg.edge_share * n)
    radius = torch.cat([
        cfg.edge_min * torch.rand(n - n_edge, dtype=dtype).sqrt(),
        cfg.edge_min + (cfg.edge_max - cfg.edge_min) * torch.rand(n_edge, dtype=dtype),
    ])
    angle = 2 * math.pi * torch.rand(n, dtype=dtype)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], -1)


def target(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(TARGET, dtype=like.dtype).expand_as(like)


def true_field(t, x):
    """``log_x(c)``: minus the hyperbolic gradient of ``d(x, c)^2 / 2``."""
    return BALL.logmap(x, target(x))


def closed_form(x0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """``exp_{x0}((1 - e^{-t}) log_{x0}(c))``: shape ``(T, B, 2)``."""
    v = BALL.logmap(x0, target(x0))  # (B, 2)
    return BALL.expmap(x0.expand(len(times), *x0.shape), (1 - torch.exp(-times))[:, None, None] * v)


def rollout(field: nn.Module, x0: torch.Tensor, times: torch.Tensor, steps: int, solve: str) -> torch.Tensor:
    """rk4 trajectories ``(T, B, 2)``: on the Poincaré ball (pinned states warned about) or in R^2."""
    manifold = BALL if solve == "ball" else None
    return solvers.odeint(field, x0, times, method="rk4", manifold=manifold,
                          options={"steps": steps, "check_finite": False, "boundary": "warn"})


def hyperbolic_error(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Hyperbolic distance from each predicted state to the truth (float64); NaN outside the disk."""
    pred = pred.double()
    inside = pred.norm(dim=-1) < 1
    safe = torch.where(inside[..., None], pred, torch.zeros_like(pred))
    # acosh(1 + 2z) = 2 asinh(sqrt z), z = |x - y|^2 / ((1 - |x|^2)(1 - |y|^2)): accurate for small
    # distances too; and not geoopt's dist, which first clips its arguments to the ball.
    z = (safe - true).pow(2).sum(-1) / ((1 - safe.pow(2).sum(-1)) * (1 - true.pow(2).sum(-1)))
    d = 2 * torch.asinh(z.sqrt())
    return torch.where(inside, d, torch.full_like(d, math.nan))


def clip_radius(dtype) -> float:
    far = torch.full((2,), 2.0, dtype=dtype)
    return BALL.projx(far).norm().item()


def train(model: nn.Module, cfg: Config, observed: torch.Tensor, times: torch.Tensor, solve: str, clip: float):
    """Adam on the mean squared coordinate error; also records the iterations whose solve reached the
    boundary (ball: a state pinned at the clip radius; Euclidean: a state outside the disk)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.iters)
    losses, boundary_iters = [], []
    limit = clip * (1 - 1e-6) if solve == "ball" else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ball's pinned states: counted here instead
        for i in range(cfg.iters):
            # Start from the noisy first observation, as one would with real data.
            predicted = rollout(model, observed[0], times, cfg.steps, solve)
            if bool((predicted.detach().norm(dim=-1) >= limit).any()):
                boundary_iters.append(i)
            loss = (predicted - observed).pow(2).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        with torch.no_grad():
            final = (rollout(model, observed[0], times, cfg.steps, solve) - observed).pow(2).sum(-1).mean()
    return losses, final.item(), boundary_iters


def _nanmean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.mean().item() if x.numel() else math.nan


def _frac(x: torch.Tensor) -> float:
    return x.double().mean().item() if x.numel() else math.nan


def fit(cfg: Config) -> dict:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dt = cfg.horizon / (cfg.n_obs - 1)
    times = torch.linspace(0, cfg.horizon, cfg.n_obs)
    n_long = cfg.extrapolate * (cfg.n_obs - 1)
    long_times = torch.linspace(0, cfg.extrapolate * cfg.horizon, n_long + 1)
    n_back = round(cfg.backward / dt)
    back_times = torch.linspace(0, -n_back * dt, n_back + 1)  # decreasing: solved backwards from x0
    in_train = long_times <= cfg.horizon + 1e-6
    late = ~in_train
    x0_train, x0_test = start_points(cfg.n_train, cfg), start_points(cfg.n_test, cfg)
    truth_train = closed_form(x0_train, long_times.double())  # (T, B, 2), float64
    truth_test = closed_form(x0_test, long_times.double())
    truth_back = closed_form(x0_test, back_times.double())
    with torch.no_grad():
        fine = solvers.odeint(true_field, x0_test, long_times.double(), method="dopri5", manifold=BALL,
                              rtol=1e-12, atol=1e-13)
    formula_check = hyperbolic_error(fine, truth_test).max().item()
    clean = truth_train[in_train].float()
    noisy = clean + cfg.noise * torch.randn_like(clean)
    observed = BALL.projx(noisy)  # a draw outside the disk is pulled back in: every observation is a point of it
    clip = clip_radius(torch.float32)

    torch.manual_seed(cfg.seed + 1)
    init = MLPField((2,), cfg.hidden)  # one initialisation, copied into both solves
    models, curves, finals, seconds, boundary_iters = {}, {}, {}, {}, {}
    for solve in SOLVES:
        models[solve] = copy.deepcopy(init)
        tic = time.perf_counter()
        curves[solve], finals[solve], boundary_iters[solve] = train(models[solve], cfg, observed, times, solve, clip)
        seconds[solve] = time.perf_counter() - tic

    edge = x0_test.norm(dim=-1) >= cfg.edge_min
    truth_inside_back = truth_back.norm(dim=-1) < clip  # the truth itself can pass the float32 clip radius
    preds, metrics = {}, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pinned states are counted below
        for solve in SOLVES:
            fwd = rollout(models[solve], x0_test.float(), long_times, cfg.steps, solve)  # (T, B, 2)
            bwd = rollout(models[solve], x0_test.float(), back_times, cfg.steps, solve)
            on_train = rollout(models[solve], x0_train.float(), long_times, cfg.steps, solve)
            preds[solve] = {"forward": fwd, "backward": bwd}
            err, err_back = hyperbolic_error(fwd, truth_test), hyperbolic_error(bwd, truth_back)
            err_train = hyperbolic_error(on_train, truth_train)
            norm, norm_back = fwd.double().norm(dim=-1), bwd.double().norm(dim=-1)
            ball = solve == "ball"
            metrics[solve] = {
                "train_dist_fit": _nanmean(err_train[in_train]),
                "train_dist_extrap": _nanmean(err_train[late]),
                "dist_fit": _nanmean(err[in_train]),
                "dist_fit_edge": _nanmean(err[in_train][:, edge]),
                "dist_fit_interior": _nanmean(err[in_train][:, ~edge]),
                "dist_extrap": _nanmean(err[late]),
                "dist_final": _nanmean(err[-1]),
                "coord_fit": (fwd.double() - truth_test).norm(dim=-1)[in_train].mean().item(),
                "coord_extrap": (fwd.double() - truth_test).norm(dim=-1)[late].mean().item(),
                "max_norm": norm.max().item(),
                "outside": None if ball else _frac((norm >= 1).any(0)),
                "excess": None if ball else (norm - 1).clamp(min=0).max().item(),
                "pinned": _frac((norm >= clip * (1 - 1e-6)).any(0)) if ball else None,
                "back_dist": _nanmean(err_back[1:]),
                "back_max_norm": norm_back.max().item(),
                "back_outside": None if ball else _frac((norm_back >= 1).any(0)),
                "back_outside_states": None if ball else _frac(norm_back[1:] >= 1),
                "back_excess": None if ball else (norm_back - 1).clamp(min=0).max().item(),
                "back_pinned": _frac((norm_back >= clip * (1 - 1e-6)).any(0)) if ball else None,
                "back_pinned_states": _frac(norm_back[1:] >= clip * (1 - 1e-6)) if ball else None,
                "err_t": torch.cat([err_back.flip(0)[:-1], err]),  # on full_times
                "norm_t": torch.cat([norm_back.flip(0)[:-1], norm]),
            }
        # States where both solves and the truth are strictly inside the clip radius: like for like.
        both = truth_inside_back[1:].clone()
        for solve in SOLVES:
            both &= preds[solve]["backward"][1:].double().norm(dim=-1) < clip * (1 - 1e-6)
        for solve in SOLVES:
            e = hyperbolic_error(preds[solve]["backward"][1:], truth_back[1:])
            metrics[solve]["back_dist_common"] = _nanmean(e[both])
        identical = torch.equal(preds["ball"]["forward"], preds["euclidean"]["forward"])
        weights_equal = all(torch.equal(a, b) for a, b in zip(models["ball"].parameters(),
                                                              models["euclidean"].parameters()))
        still = hyperbolic_error(x0_test.expand_as(truth_test), truth_test)
    return {
        "config": cfg,
        "times": times,
        "long_times": long_times,
        "back_times": back_times,
        "full_times": torch.cat([back_times.flip(0)[:-1], long_times]),
        "losses": curves,
        "final_train_loss": finals,
        "train_seconds": seconds,
        "boundary_iters": boundary_iters,
        "metrics": metrics,
        "identical_forward": identical,
        "identical_weights": weights_equal,
        "formula_check": formula_check,
        "clip": clip,
        "observed_clipped": _frac(noisy.norm(dim=-1) >= clip),
        "truth_back_beyond_clip": _frac((~truth_inside_back).any(0)),
        "back_common_states": _frac(both),
        "stay_put": {"fit": _nanmean(still[in_train]), "extrap": _nanmean(still[late])},
        "x0_test": x0_test,
        "truth_test": truth_test,
        "truth_back": truth_back,
        "preds": preds,
        "seconds": time.perf_counter() - start,
    }


def write_csv(result: dict, path: Path) -> None:
    clip = result["clip"] * (1 - 1e-6)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "solve", "dist_err_mean_inside", "dist_err_median_inside", "frac_outside_disk",
                    "frac_at_clip_or_beyond", "max_norm"])
        for solve in SOLVES:
            m = result["metrics"][solve]
            for i, t in enumerate(result["full_times"].tolist()):
                d, n = m["err_t"][i], m["norm_t"][i]
                inside = d[torch.isfinite(d)]
                median = inside.median().item() if inside.numel() else math.nan
                w.writerow([f"{t:.4g}", solve, f"{_nanmean(d):.6g}", f"{median:.6g}", f"{_frac(n >= 1):.6g}",
                            f"{_frac(n >= clip):.6g}", f"{n.max().item():.6g}"])


def plot(result: dict, path: Path, shown: int = 16) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    cfg = result["config"]
    fig = Figure(figsize=(19, 5.6))
    styles = {"ball": ("C0", "rk4 on PoincareBall"), "euclidean": ("C3", "rk4 in R^2 (no manifold)")}
    truth, truth_back = result["truth_test"].numpy(), result["truth_back"].numpy()
    norms = result["x0_test"].norm(dim=-1)
    order = torch.argsort(norms, descending=True)
    picks = order[: shown // 2].tolist() + order[len(order) // 2:][: shown // 2].tolist()  # edge and inner starts
    circle = np.linspace(0, 2 * np.pi, 200)
    for k, solve in enumerate(SOLVES):
        ax = fig.add_subplot(1, 4, k + 1)
        colour, label = styles[solve]
        ax.plot(np.cos(circle), np.sin(circle), color="k", linewidth=1)
        fwd, bwd = result["preds"][solve]["forward"].numpy(), result["preds"][solve]["backward"].numpy()
        for i in picks:
            ax.plot(truth[:, i, 0], truth[:, i, 1], color="0.6", linewidth=1.5)
            ax.plot(truth_back[:, i, 0], truth_back[:, i, 1], color="0.8", linewidth=1.5)
            ax.plot(fwd[:, i, 0], fwd[:, i, 1], color=colour, linestyle="--", linewidth=1)
            ax.plot(bwd[:, i, 0], bwd[:, i, 1], color=colour, linestyle=":", linewidth=1.2)
            ax.scatter(truth[0, i, 0], truth[0, i, 1], color="k", s=8, zorder=3)
        ax.scatter(*TARGET, marker="*", color="k", s=60, zorder=3)
        ax.set_title(f"{label}\nheld-out: truth (grey), learned forward (dashed),\nbackward t < 0 (dotted)",
                     fontsize=8)
        ax.set_aspect("equal")
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
    t = result["full_times"].numpy()
    ax_err, ax_out = fig.add_subplot(1, 4, 3), fig.add_subplot(1, 4, 4)
    for solve in SOLVES:
        colour, label = styles[solve]
        m = result["metrics"][solve]
        d, n = m["err_t"].numpy().copy(), m["norm_t"].numpy()
        d[t == 0] = np.nan  # exact initial states: no error to show on a log scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # times with no state inside the disk
            mean, median = np.nanmean(d, axis=1), np.nanmedian(d, axis=1)
        ax_err.semilogy(t, mean, color=colour, label=f"{label}: mean (states inside the disk)")
        ax_err.semilogy(t, median, color=colour, linestyle="--", label=f"{label}: median")
        if solve == "ball":
            ax_out.plot(t, (n >= result["clip"] * (1 - 1e-6)).mean(1), color=colour, label=f"{label}: pinned at clip")
        else:
            ax_out.plot(t, (n >= 1).mean(1), color=colour, label=f"{label}: outside the disk")
    beyond = (np.linalg.norm(truth_back, axis=-1) >= result["clip"]).mean(1)[::-1][:-1]
    ax_out.plot(t[: len(beyond)], beyond, color="0.5", linestyle=":", label="truth beyond the float32 clip radius")
    for ax in (ax_err, ax_out):
        ax.axvline(cfg.horizon, color="0.5", linestyle=":")
        ax.axvspan(t[0], 0, color="0.9", label="backward in time")
        ax.set_xlabel("t (training on [0, %g])" % cfg.horizon)
        ax.legend(fontsize=7)
    ax_err.set_ylabel("hyperbolic distance to the truth")
    ax_err.set_title("held-out error vs time")
    ax_out.set_ylabel("fraction of held-out states")
    ax_out.set_title("states at or past the boundary")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def write_report(result: dict, path: Path, command: str, smoke: bool) -> None:
    cfg = result["config"]
    mb, me = result["metrics"]["ball"], result["metrics"]["euclidean"]
    T, TT, TB = cfg.horizon, cfg.extrapolate * cfg.horizon, -result["back_times"][-1].item()
    iters = result["boundary_iters"]

    def row(name, key, fmt=".3g"):
        name = name.replace("|", "\\|")  # a pipe inside a cell would end it
        return f"| {name} | {_cell(mb[key], fmt)} | {_cell(me[key], fmt)} |\n"

    def when(its):
        return f"{len(its)} (iterations {its[0]}..{its[-1]})" if its else "0"

    settings = "\n".join(f"| `{k}` | {v} |" for k, v in asdict(cfg).items())
    if result["identical_weights"]:
        why = ("no training solve reached the clip radius, so both trainings did the same arithmetic: the "
               "trained weights are bit-for-bit equal")
    else:
        why = (f"the two trainings parted where a solve reached the boundary (ball: {when(iters['ball'])} pinned "
               f"a state; R^2: {when(iters['euclidean'])} left the disk), so the trained weights differ")
    text = (
        ("**SMOKE RUN** (tiny settings: the numbers below say nothing about the method)\n\n" if smoke else "")
        + "# Learned flow on the Poincaré disk: on the ball vs in R^2\n\n"
        f"- command: `{command}`\n"
        f"- torch {torch.__version__}, geoopt {geoopt.__version__}, 1 thread, seeds: data `{cfg.seed}`, "
        f"model init `{cfg.seed + 1}` (the same initial weights for both solves)\n"
        f"- runtime: {result['seconds']:.0f} s in all (training: ball {result['train_seconds']['ball']:.0f} s, "
        f"Euclidean {result['train_seconds']['euclidean']:.0f} s)\n\n"
        f"Truth: the hyperbolic gradient flow of d(x, c)^2 / 2, c = {TARGET}, on the unit Poincaré disk: "
        "x(t) = exp_x0((1 - e^-t) log_x0(c)), so d(x(t), c) = d(x0, c) e^-t. The closed form agrees with a "
        f"float64 dopri5 solve of dx/dt = log_x(c) (rtol 1e-12) to a hyperbolic distance of "
        f"{result['formula_check']:.1e} over [0, {TT:g}].\n\n"
        f"Data: {cfg.n_train} start points, {cfg.edge_share:.0%} of them with |x0| in [{cfg.edge_min}, "
        f"{cfg.edge_max}] and the rest uniform over the disk of radius {cfg.edge_min}, observed at "
        f"{cfg.n_obs} times on [0, {T:g}] with N(0, {cfg.noise}^2) noise on the coordinates (then projected "
        f"onto the ball: {result['observed_clipped']:.1%} of observations were clipped). Model: MLP 2 -> "
        f"{cfg.hidden} -> {cfg.hidden} -> 2 (SiLU), the same initial weights trained twice with Adam "
        f"({cfg.iters} iterations, lr {cfg.lr}, cosine) on the mean squared coordinate error, rk4 with "
        f"{cfg.steps} steps per observation interval: once on `geoopt.PoincareBall()` (strict mode, "
        "`boundary=\"warn\"`), once in R^2 (`manifold=None`).\n\n"
        "**What the manifold changes here.** On the ball `proju` is the identity and `retr(x, u)` is `x + u` "
        f"clipped to the radius {result['clip']:.4f} (geoopt's float32 eps, 4e-3), so the two solves are the "
        "same arithmetic until a state reaches that radius. There the ball solve pins the state (with the "
        "default `boundary=\"raise\"` it stops with `BoundaryError`), while the Euclidean state leaves the "
        "disk, where the hyperbolic distance is undefined. Accuracy inside the disk is not what the ball "
        "can improve; staying a point of the disk is.\n\n"
        f"Evaluation: {cfg.n_test} held-out start points (same distribution), exact initial states, the same "
        f"step. Forward over [0, {TT:g}] = {cfg.extrapolate}x the training horizon; and backward in time over "
        f"[-{TB:g}, 0], where the true flow runs away from c towards the boundary (its distance to c grows as "
        f"e^|t|): the stress test for the boundary, outside the training data. Distance errors are means "
        "over the states inside the disk; states outside are counted separately.\n\n"
        "## Results\n\n"
        "| metric | on the ball | in R^2 |\n|---|---|---|\n"
        f"| final train loss (mean squared coordinate error to the noisy observations) | "
        f"{result['final_train_loss']['ball']:.3g} | {result['final_train_loss']['euclidean']:.3g} |\n"
        f"| training iterations whose solve pinned a state (ball) / left the disk (R^2), of {cfg.iters} | "
        f"{when(iters['ball'])} | {when(iters['euclidean'])} |\n"
        + row(f"train starts: hyperbolic error on [0, {T:g}] (mean)", "train_dist_fit")
        + row(f"train starts: hyperbolic error on ({T:g}, {TT:g}] (mean)", "train_dist_extrap")
        + row(f"held-out: hyperbolic error on [0, {T:g}] (mean)", "dist_fit")
        + row(f"held-out: same, start points with |x0| >= {cfg.edge_min}", "dist_fit_edge")
        + row(f"held-out: same, start points with |x0| < {cfg.edge_min}", "dist_fit_interior")
        + row(f"held-out: hyperbolic error on ({T:g}, {TT:g}] (mean)", "dist_extrap")
        + row(f"held-out: hyperbolic error at t = {TT:g} (mean)", "dist_final")
        + f"| held-out: coordinate error on [0, {T:g}] / ({T:g}, {TT:g}] (mean) | {mb['coord_fit']:.3g} / "
        f"{mb['coord_extrap']:.3g} | {me['coord_fit']:.3g} / {me['coord_extrap']:.3g} |\n"
        + row("held-out, forward: trajectories that leave the disk", "outside", ".1%")
        + row("held-out, forward: trajectories with a state pinned at the clip radius", "pinned", ".1%")
        + row("held-out, forward: largest |x|", "max_norm", ".5f")
        + row(f"backward [-{TB:g}, 0): trajectories that leave the disk", "back_outside", ".1%")
        + row(f"backward [-{TB:g}, 0): states outside the disk", "back_outside_states", ".1%")
        + row(f"backward [-{TB:g}, 0): largest norm excess max(|x| - 1, 0)", "back_excess", ".3g")
        + row(f"backward [-{TB:g}, 0): trajectories with a state pinned at the clip radius", "back_pinned", ".1%")
        + row(f"backward [-{TB:g}, 0): states pinned at the clip radius", "back_pinned_states", ".1%")
        + row(f"backward [-{TB:g}, 0): hyperbolic error (mean over states inside the disk)", "back_dist")
        + row(f"backward [-{TB:g}, 0): hyperbolic error on the states where both solves and the truth are "
              f"inside the clip radius ({result['back_common_states']:.0%} of them)", "back_dist_common")
        + f"| backward: true trajectories that pass the float32 clip radius | "
        f"{result['truth_back_beyond_clip']:.1%} | same |\n"
        f"| held-out: a field that stays put, error on [0, {T:g}] / ({T:g}, {TT:g}] | "
        f"{result['stay_put']['fit']:.3g} / {result['stay_put']['extrap']:.3g} | same |\n\n"
        "## Reading\n\n"
        f"- Training: {why}.\n"
        f"- Forward (the training direction and its {cfg.extrapolate}x extrapolation): "
        + (f"no held-out state reached the boundary (largest |x| {me['max_norm']:.4f} in R^2)"
           if not me["outside"] and not mb["pinned"] else
           f"{me['outside']:.0%} of the Euclidean held-out trajectories left the disk and {mb['pinned']:.0%} of "
           "the ball's had a pinned state")
        + f", and the forward held-out trajectories are "
        f"{'bit-for-bit identical' if result['identical_forward'] else 'different only through those weights'}. "
        f"Hyperbolic error ball vs R^2: {mb['dist_fit']:.3g} vs {me['dist_fit']:.3g} on [0, {T:g}], "
        f"{mb['dist_extrap']:.3g} vs {me['dist_extrap']:.3g} on ({T:g}, {TT:g}]: "
        + ("no meaningful difference" if abs(mb['dist_fit'] - me['dist_fit']) < 0.1 * me['dist_fit']
           and abs(mb['dist_extrap'] - me['dist_extrap']) < 0.1 * me['dist_extrap'] else "they differ")
        + f". Near the boundary the error is {mb['dist_fit_edge'] / mb['dist_fit_interior']:.1f}x larger "
        f"({mb['dist_fit_edge']:.3g} vs {mb['dist_fit_interior']:.3g} inside, ball): a loss on coordinates under-weights the region where "
        "hyperbolic distances are largest, on either solve.\n"
        f"- Backward (towards the boundary): {me['back_outside']:.0%} of the Euclidean trajectories leave the "
        f"disk (largest excess {me['back_excess']:.3g}); on the ball {mb['back_pinned']:.0%} are pinned at the "
        f"clip radius instead (flagged: `BoundaryError` by default). The truth itself passes the float32 clip "
        f"radius on {result['truth_back_beyond_clip']:.0%} of them, so neither solve can be accurate there; the "
        "ball's states stay points of the disk with a finite (large) error, the Euclidean ones stop being "
        f"points at all. On the states that are inside for both and for the truth the errors are "
        f"{mb['back_dist_common']:.3g} (ball) vs {me['back_dist_common']:.3g} (R^2); the Euclidean mean over all "
        f"its inside states ({me['back_dist']:.3g}) leaves out the ones that escaped, the ball's "
        f"({mb['back_dist']:.3g}) counts its pinned ones.\n\n"
        f"![trajectories and error vs time]({NAME}.png)\n\n"
        f"Per-time numbers (held-out set, t < 0 backward): `{NAME}.csv`.\n\n"
        "| setting | value |\n|---|---|\n" + settings + "\n"
    )
    path.write_text(text)


def summary(result) -> str:
    lines = []
    for solve in SOLVES:
        m = result["metrics"][solve]
        lines.append(f"{solve:9s}: held-out error {m['dist_fit']:.3g} (fit) / {m['dist_extrap']:.3g} (extrapolated); "
                     f"backward: outside the disk {_cell(m['back_outside'], '.1%')}, pinned "
                     f"{_cell(m['back_pinned'], '.1%')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return worked_example.main("poincare_flow", __doc__, argv, Config(), SMOKE, fit, write_csv, plot, write_report,
                               summary)


if __name__ == "__main__":
    main()
