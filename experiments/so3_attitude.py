"""Learn rigid-body attitude dynamics on SO(3) from noisy trajectories: on the manifold vs in R^{3x3}.

Ground truth: a free rigid body (principal moments ``I = diag(1, 2, 3)``) whose angular momentum in
the space frame is a fixed vector ``m``. With ``m`` fixed, the body angular velocity is
``Omega = I^{-1} R^T m``, so the attitude alone obeys the autonomous, nonlinear ODE on SO(3)

    dR/dt = R hat(I^{-1} R^T m).

Different initial attitudes give different body-frame momenta ``R0^T m``, hence different spin
states (rotation about the major axis, the minor axis, or tumbling near the unstable middle axis).
The reference trajectories are a float64 dopri5 solve at rtol 1e-12 on SO(3); the report states
how far it is from an independent fine rk4 solve and how well it conserves the kinetic energy
``E = m^T R I^{-1} R^T m / 2``.

Observations: ``n_obs`` times on ``[0, horizon]``, each rotation perturbed by Gaussian noise and
projected back onto SO(3) (polar factor).

Model: one MLP ``R^9 -> R^9`` on the flattened rotation. The *same* architecture and the *same*
initial weights are trained twice with the same data, optimiser and rk4 steps:

- manifold: ``solvers.odeint(..., method="rk4", manifold=manifolds.SpecialOrthogonal())``; strict
  mode projects the field onto the tangent space ``R so(3)`` and each step ends with a retraction,
  so every state is a rotation;
- Euclidean: ``solvers.odeint(..., method="rk4", manifold=None)``: the plain solve in R^{3x3}.

Evaluation on held-out initial attitudes over 3x the training horizon: orientation error (geodesic
angle in degrees; a Euclidean state that is no longer a rotation is first replaced by its nearest
rotation, the most charitable reading), the raw Frobenius error, and the drift ``|R^T R - I|_F``.

Writes ``so3_attitude.{md,csv,png}`` to ``--out``.

    python -m experiments.so3_attitude [--smoke] [--out experiments/results]
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import manifolds
import solvers

from . import worked_example
from .worked_example import MLPField

SO3 = manifolds.SpecialOrthogonal()
NAME = "so3_attitude"
SOLVES = ("manifold", "euclidean")


@dataclass
class Config:
    n_train: int = 48  # observed trajectories
    n_test: int = 32  # held-out trajectories (new initial attitudes)
    n_obs: int = 11  # observation times per trajectory, evenly spaced on [0, horizon]
    horizon: float = 2.0  # training time span
    extrapolate: int = 3  # evaluate on [0, extrapolate * horizon]
    noise: float = 0.03  # std of the Gaussian noise added to each matrix entry before projecting
    hidden: int = 64  # width of the MLP's two hidden layers
    steps: int = 2  # rk4 steps per observation interval
    iters: int = 800  # Adam iterations (full batch), per model
    lr: float = 5e-3  # Adam learning rate (cosine-decayed to 0)
    seed: int = 0


SMOKE = Config(n_train=8, n_test=8, n_obs=6, hidden=16, iters=15)

INERTIA = (1.0, 2.0, 3.0)  # principal moments of inertia
MOMENTUM = (0.3, -0.5, 1.4)  # angular momentum in the space frame (fixed)


def hat(w: torch.Tensor) -> torch.Tensor:
    """``(..., 3) -> (..., 3, 3)``: the skew matrix with ``hat(w) v = w x v``."""
    zero = torch.zeros_like(w[..., 0])
    x, y, z = w.unbind(-1)
    return torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )


class RigidBody(nn.Module):
    """The free rigid body's attitude field ``R hat(I^{-1} R^T m)`` for a fixed space momentum ``m``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_inertia", 1 / torch.tensor(INERTIA, dtype=torch.float64))
        self.register_buffer("m", torch.tensor(MOMENTUM, dtype=torch.float64))

    def forward(self, t, r):
        body = torch.einsum("...ji,j->...i", r, self.m.to(r))  # R^T m: the momentum in the body frame
        return r @ hat(self.inv_inertia.to(r) * body)

    def energy(self, r: torch.Tensor) -> torch.Tensor:
        body = torch.einsum("...ji,j->...i", r, self.m.to(r))  # R^T m
        return 0.5 * (self.inv_inertia.to(r) * body**2).sum(-1)


def rollout(field: nn.Module, r0: torch.Tensor, times: torch.Tensor, steps: int, solve: str) -> torch.Tensor:
    """rk4 trajectories ``(T, B, 3, 3)``: on SO(3) in strict mode, or in R^{3x3}."""
    manifold = SO3 if solve == "manifold" else None
    # A diverging Euclidean solve is reported, not raised: its non-finite states show up in the metrics.
    return solvers.odeint(field, r0, times, method="rk4", manifold=manifold,
                          options={"steps": steps, "check_finite": False})


def reference(r0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The true trajectories in float64: dopri5 at rtol 1e-12 on SO(3)."""
    with torch.no_grad():
        return solvers.odeint(RigidBody(), r0.double(), times.double(), method="dopri5", manifold=SO3,
                              rtol=1e-12, atol=1e-12)


def nearest_rotation(a: torch.Tensor) -> torch.Tensor:
    """The rotation nearest to each ``a`` (SVD; for evaluation only). Non-finite input stays NaN."""
    finite = torch.isfinite(a).all(dim=(-2, -1))
    safe = torch.where(finite[..., None, None], a, torch.eye(3, dtype=a.dtype))
    u, _, vh = torch.linalg.svd(safe)
    d = torch.linalg.det(u @ vh)
    u = torch.cat([u[..., :2], u[..., 2:] * d[..., None, None]], dim=-1)
    return torch.where(finite[..., None, None], u @ vh, torch.full_like(a, math.nan))


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations, in degrees: ``2 asin(|A - B|_F / sqrt 8)`` (stable near 0)."""
    chord = (a - b).norm(dim=(-2, -1)) / math.sqrt(8)
    return torch.rad2deg(2 * torch.asin(chord.clamp(max=1.0)))


def drift(r: torch.Tensor) -> torch.Tensor:
    """``|R^T R - I|_F`` per matrix."""
    return (r.transpose(-1, -2) @ r - torch.eye(3, dtype=r.dtype)).norm(dim=(-2, -1))


def orientation_error(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (degrees) from the true rotation to the nearest rotation to ``pred``."""
    return angle_deg(nearest_rotation(pred.double()), true.double())


def train(model: nn.Module, cfg: Config, observed: torch.Tensor, times: torch.Tensor, solve: str):
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.iters)
    losses = []
    for _ in range(cfg.iters):
        # Start from the noisy first observation, as one would with real data.
        predicted = rollout(model, observed[0], times, cfg.steps, solve)
        loss = (predicted - observed).pow(2).sum(dim=(-2, -1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = (rollout(model, observed[0], times, cfg.steps, solve) - observed).pow(2).sum(dim=(-2, -1)).mean()
    return losses, final.item()


def _mean(x: torch.Tensor) -> float:
    return x.mean().item() if x.numel() else math.nan


def fit(cfg: Config) -> dict:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    times = torch.linspace(0, cfg.horizon, cfg.n_obs)
    dt = cfg.horizon / (cfg.n_obs - 1)
    long_times = torch.linspace(0, cfg.extrapolate * cfg.horizon, cfg.extrapolate * (cfg.n_obs - 1) + 1)
    in_train = long_times <= cfg.horizon + 1e-6
    r0_train = SO3.random(cfg.n_train, 3, 3, dtype=torch.float64)
    r0_test = SO3.random(cfg.n_test, 3, 3, dtype=torch.float64)
    truth_train = reference(r0_train, long_times)  # (T_long, n_train, 3, 3), float64
    truth_test = reference(r0_test, long_times)
    clean = truth_train[in_train].float()  # (n_obs, n_train, 3, 3)
    observed = SO3.projx(clean + cfg.noise * torch.randn_like(clean))

    # How good is the reference? An independent fine rk4 solve, and the conserved energy.
    check = solvers.odeint(RigidBody(), r0_test.double(), long_times.double(), method="rk4", manifold=SO3,
                           options={"step_size": dt / 50})
    energy = RigidBody().energy(truth_test)
    ref_check = {
        "ref_vs_fine_rk4_deg": angle_deg(check, truth_test).max().item(),
        "ref_energy_rel_drift": ((energy - energy[0]).abs() / energy[0]).max().item(),
        "noise_deg": angle_deg(observed.double(), clean.double()).mean().item(),
    }

    torch.manual_seed(cfg.seed + 1)
    init = MLPField((3, 3), cfg.hidden)  # one initialisation, copied into both solves
    models, curves, finals, seconds = {}, {}, {}, {}
    for solve in SOLVES:
        models[solve] = copy.deepcopy(init)
        tic = time.perf_counter()
        curves[solve], finals[solve] = train(models[solve], cfg, observed, times, solve)
        seconds[solve] = time.perf_counter() - tic

    x0 = {"train": r0_train.float(), "test": r0_test.float()}
    truth = {"train": truth_train, "test": truth_test}
    preds, metrics = {}, {}
    steps_long = cfg.steps  # same step size as in training
    with torch.no_grad():
        for solve in SOLVES:
            for split in ("train", "test"):
                pred = rollout(models[solve], x0[split], long_times, steps_long, solve)  # (T_long, B, 3, 3)
                preds[solve, split] = pred
                ang = orientation_error(pred, truth[split])  # (T_long, B)
                frob = (pred.double() - truth[split]).norm(dim=(-2, -1))
                dr = drift(pred.double())
                late = ~in_train
                metrics[solve, split] = {
                    "angle_fit_deg": _mean(ang[in_train]),
                    "angle_extrap_deg": _mean(ang[late]),
                    "angle_final_deg": _mean(ang[-1]),
                    "frob_fit": _mean(frob[in_train]),
                    "frob_extrap": _mean(frob[late]),
                    "drift_at_horizon": dr[in_train][-1].max().item(),
                    "drift_max": dr.max().item(),
                    "drift_final_median": dr[-1].median().item(),
                    "det_final_min": torch.linalg.det(pred[-1].double()).min().item(),
                    "nonfinite": int((~torch.isfinite(pred)).any(dim=(-2, -1)).sum()),
                    "angle_t": ang,
                    "drift_t": dr,
                }
        # A field that stays put: what "no dynamics learned" scores on the held-out set.
        still = angle_deg(r0_test.expand_as(truth_test), truth_test)
    return {
        "config": cfg,
        "times": times,
        "long_times": long_times,
        "losses": curves,
        "final_train_loss": finals,
        "train_seconds": seconds,
        "metrics": metrics,
        "stay_put": {"fit": _mean(still[in_train]), "extrap": _mean(still[~in_train])},
        "reference": ref_check,
        "truth_test": truth_test,
        "preds": preds,
        "seconds": time.perf_counter() - start,
    }


def write_csv(result: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "solve", "angle_mean_deg", "angle_median_deg", "angle_max_deg", "drift_mean", "drift_max"])
        for solve in SOLVES:
            m = result["metrics"][solve, "test"]
            for i, t in enumerate(result["long_times"].tolist()):
                a, d = m["angle_t"][i], m["drift_t"][i]
                w.writerow([f"{t:.4g}", solve, f"{a.mean().item():.6g}", f"{a.median().item():.6g}",
                            f"{a.max().item():.6g}", f"{d.mean().item():.6g}", f"{d.max().item():.6g}"])


def plot(result: dict, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    cfg = result["config"]
    t = result["long_times"].numpy()
    fig = Figure(figsize=(15, 4.5))
    axes = [fig.add_subplot(1, 3, i) for i in (1, 2, 3)]
    styles = {"manifold": ("C0", "rk4 on SO(3) (strict)"), "euclidean": ("C3", "rk4 in R^{3x3} (no manifold)")}
    for solve in SOLVES:
        colour, label = styles[solve]
        m = result["metrics"][solve, "test"]
        ang, dr = m["angle_t"].numpy(), m["drift_t"].numpy()
        axes[0].plot(t, ang.mean(1), color=colour, label=label)
        axes[0].fill_between(t, *[np.nanpercentile(ang, q, axis=1) for q in (25, 75)],
                             color=colour, alpha=0.2)
        axes[1].semilogy(t, dr.max(1), color=colour, label=f"{label}: max")
        axes[1].semilogy(t, dr.mean(1), color=colour, linestyle="--", label=f"{label}: mean")
        axes[2].semilogy(result["losses"][solve], color=colour, label=label)
    for ax in axes[:2]:
        ax.axvline(cfg.horizon, color="0.5", linestyle=":", label="end of training horizon")
        ax.set_xlabel("t")
    axes[0].set_ylabel("orientation error (degrees)")
    axes[0].set_title("held-out attitudes: mean error (band: 25-75%)")
    axes[1].set_ylabel("|R^T R - I|_F")
    axes[1].set_title("drift off SO(3)")
    axes[2].set_xlabel("Adam iteration")
    axes[2].set_ylabel("train loss (mean squared Frobenius)")
    axes[2].set_title("training")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(result: dict, path: Path, command: str, smoke: bool) -> None:
    cfg = result["config"]
    mt, me = result["metrics"]["manifold", "test"], result["metrics"]["euclidean", "test"]
    T, TT = cfg.horizon, cfg.extrapolate * cfg.horizon
    ref = result["reference"]

    def row(name, key, fmt=".3g", split="test"):
        a, b = result["metrics"]["manifold", split][key], result["metrics"]["euclidean", split][key]
        name = name.replace("|", "\\|")  # a pipe inside a cell would end it
        return f"| {name} | {a:{fmt}} | {b:{fmt}} |\n"

    settings = "\n".join(f"| `{k}` | {v} |" for k, v in asdict(cfg).items())

    def verdict(a, b):
        if abs(a - b) <= 0.1 * max(abs(a), abs(b)):
            return "about the same"
        return "SO(3) lower" if a < b else "SO(3) higher"

    def pair(key, split="test"):
        a, b = result["metrics"]["manifold", split][key], result["metrics"]["euclidean", split][key]
        return f"{a:.3g} vs {b:.3g} degrees ({verdict(a, b)})"

    text = (
        ("**SMOKE RUN** (tiny settings: the numbers below say nothing about the method)\n\n" if smoke else "")
        + "# Learned rigid-body attitude dynamics on SO(3): on the manifold vs in R^{3x3}\n\n"
        f"- command: `{command}`\n"
        f"- torch {torch.__version__}, 1 thread, seeds: data `{cfg.seed}`, model init `{cfg.seed + 1}` "
        f"(the same initial weights for both solves)\n"
        f"- runtime: {result['seconds']:.0f} s in all (training: manifold {result['train_seconds']['manifold']:.0f} s, "
        f"Euclidean {result['train_seconds']['euclidean']:.0f} s)\n\n"
        "Truth: free rigid body, inertia diag(1, 2, 3), fixed space-frame angular momentum "
        f"m = {MOMENTUM}, so dR/dt = R hat(I^-1 R^T m). Reference: float64 dopri5 at rtol 1e-12 on SO(3); "
        f"it agrees with an independent rk4 solve at step {cfg.horizon / (cfg.n_obs - 1) / 50:.2g} to "
        f"{ref['ref_vs_fine_rk4_deg']:.1e} degrees and conserves the kinetic energy to a relative "
        f"{ref['ref_energy_rel_drift']:.1e} over [0, {TT:g}].\n\n"
        f"Data: {cfg.n_train} Haar-random initial attitudes observed at {cfg.n_obs} times on [0, {T:g}], each "
        f"entry perturbed by N(0, {cfg.noise}^2) and projected back onto SO(3) (mean noise "
        f"{ref['noise_deg']:.2f} degrees). Model: MLP 9 -> {cfg.hidden} -> {cfg.hidden} -> 9 (SiLU), "
        f"the same initial weights trained twice with Adam ({cfg.iters} iterations, lr {cfg.lr}, cosine), "
        f"rk4 with {cfg.steps} steps per observation interval (h = {cfg.horizon / (cfg.n_obs - 1) / cfg.steps:g}): "
        "once on `manifolds.SpecialOrthogonal()` (strict mode), once in R^{3x3} (`manifold=None`).\n\n"
        f"Evaluation: {cfg.n_test} held-out initial attitudes, exact initial states, the same step, over "
        f"[0, {TT:g}] = {cfg.extrapolate}x the training horizon. Orientation error is the geodesic angle to the "
        "truth; for the Euclidean solve, whose states are not rotations, it is measured from the nearest "
        "rotation (SVD polar factor), the most favourable reading; the raw Frobenius error is reported too.\n\n"
        "## Results\n\n"
        "| metric | on SO(3) | in R^{3x3} |\n|---|---|---|\n"
        + f"| final train loss (mean squared Frobenius distance to the noisy observations) | "
        f"{result['final_train_loss']['manifold']:.3g} | {result['final_train_loss']['euclidean']:.3g} |\n"
        + row(f"train attitudes: orientation error on [0, {T:g}] (deg, mean)", "angle_fit_deg", split="train")
        + row(f"train attitudes: orientation error on ({T:g}, {TT:g}] (deg, mean)", "angle_extrap_deg", split="train")
        + row(f"held-out: orientation error on [0, {T:g}] (deg, mean)", "angle_fit_deg")
        + row(f"held-out: orientation error on ({T:g}, {TT:g}] (deg, mean)", "angle_extrap_deg")
        + row(f"held-out: orientation error at t = {TT:g} (deg, mean)", "angle_final_deg")
        + row(f"held-out: Frobenius error on [0, {T:g}] (mean)", "frob_fit")
        + row(f"held-out: Frobenius error on ({T:g}, {TT:g}] (mean)", "frob_extrap")
        + row(f"held-out: drift max |R^T R - I|_F at t = {T:g}", "drift_at_horizon", ".2e")
        + row(f"held-out: drift max |R^T R - I|_F over [0, {TT:g}]", "drift_max", ".2e")
        + row(f"held-out: drift median at t = {TT:g}", "drift_final_median", ".2e")
        + row(f"held-out: min det R at t = {TT:g}", "det_final_min", ".4f")
        + row("held-out: trajectories with non-finite states", "nonfinite", "d")
        + f"| held-out: a field that stays put, error on [0, {T:g}] / ({T:g}, {TT:g}] (deg) | "
        f"{result['stay_put']['fit']:.3g} / {result['stay_put']['extrap']:.3g} | same |\n\n"
        "## Reading\n\n"
        f"- Drift: the SO(3) solve stays a rotation to float32 rounding ({mt['drift_max']:.1e}); the Euclidean "
        f"solve of the same architecture leaves SO(3) ({me['drift_at_horizon']:.1e} at the end of the training "
        f"horizon, {me['drift_max']:.1e} at worst over [0, {TT:g}]).\n"
        f"- Fit within the training horizon [0, {T:g}], SO(3) vs R^{{3x3}}: held-out attitudes "
        f"{pair('angle_fit_deg')}; training attitudes {pair('angle_fit_deg', 'train')}.\n"
        f"- Extrapolation to ({T:g}, {TT:g}]: held-out attitudes {pair('angle_extrap_deg')}, at t = {TT:g} "
        f"{pair('angle_final_deg')}; training attitudes {pair('angle_extrap_deg', 'train')}.\n"
        "- The Euclidean angles are measured after projecting its states onto SO(3); unprojected, its states "
        f"are {me['frob_extrap']:.3g} (Frobenius) from the truth after the horizon, vs {mt['frob_extrap']:.3g} on "
        f"SO(3).\n- One seed (`--seed` picks another); the spread over seeds is not measured here, so read "
        "differences of a few tenths of a degree as ties.\n\n"
        f"![error and drift vs time]({NAME}.png)\n\n"
        f"Per-time numbers (held-out set): `{NAME}.csv`.\n\n"
        "| setting | value |\n|---|---|\n" + settings + "\n"
    )
    path.write_text(text)


def summary(result) -> str:
    lines = []
    for solve in SOLVES:
        m = result["metrics"][solve, "test"]
        lines.append(f"{solve:9s}: held-out error {m['angle_fit_deg']:.3g} deg (fit) / {m['angle_extrap_deg']:.3g} "
                     f"deg (extrapolated), max drift {m['drift_max']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return worked_example.main("so3_attitude", __doc__, argv, Config(), SMOKE, fit, write_csv, plot, write_report,
                               summary)


if __name__ == "__main__":
    main()
