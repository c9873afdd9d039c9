"""``integrate``: the solve loop shared by every solver, with validation and statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import geoopt
import torch
from torch.utils.checkpoint import checkpoint

from .checkpointing import checkpointed_steps
from .controllers import ConstantStepSize, PIController
from .errors import NonFiniteError, OffManifoldError, StepSizeError, describe

__all__ = ["Solution", "SolveStats", "integrate", "GRADIENT_MODES"]

GRADIENT_MODES = ("backprop", "checkpoint", "adjoint")


@dataclass
class SolveStats:
    """What a solve cost."""

    steps: int = 0  # accepted steps
    nfe: int = 0  # field evaluations
    rejected: int = 0  # rejected steps (adaptive only)


@dataclass
class Solution:
    """States at the requested times and the cost of getting there."""

    ts: torch.Tensor  # (T,)
    ys: torch.Tensor  # (T, *y0.shape)
    stats: SolveStats = field(default_factory=SolveStats)


class _CountedField:
    """Wraps the user's field: counts evaluations and checks the output shape."""

    def __init__(self, f: Callable, stats: SolveStats):
        self.f = f
        self.stats = stats

    def __call__(self, t, x):
        self.stats.nfe += 1
        out = self.f(t, x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the field returned {got} at t={float(t):.6g}; it must return a tensor shaped "
                f"like the state, {tuple(x.shape)}"
            )
        return out


def _times(t) -> list[float]:
    t = torch.as_tensor(t)
    if t.dim() != 1 or len(t) < 1:
        raise ValueError(f"t must be a 1-D tensor of output times, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"t must be finite, got {t.tolist()}")
    ts = t.tolist()
    diffs = [b - a for a, b in zip(ts, ts[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {ts}")
    return ts


def check_on_manifold(y0: torch.Tensor, manifold) -> None:
    """Raise ``OffManifoldError`` (saying by how much) if ``y0`` is off ``manifold``."""
    tol = 1e-4 if y0.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
    ok, reason = manifold.check_point_on_manifold(y0.detach(), explain=True, atol=tol, rtol=tol)
    if not ok:
        gap = (manifold.projx(y0.detach()) - y0.detach()).abs().max().item()
        raise OffManifoldError(
            f"y0 is not on {manifold!r}: {reason}; projx moves it by up to {gap:.3g}. "
            f"Project it first with manifold.projx(y0)."
        )


def _check_finite(x: torch.Tensor, where: str) -> None:
    # One sum costs far less per step than an elementwise isfinite (~40x at 256 x 256 on CPU). It
    # is non-finite whenever an entry is; a false alarm from finite entries overflowing the sum is
    # cleared by the exact check below.
    if math.isfinite(x.detach().sum().item()):
        return
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"the state became non-finite {where}: {describe(x)}")


def integrate(
    f: Callable,
    y0: torch.Tensor,
    t,
    *,
    solver,
    manifold: geoopt.Manifold | None = None,
    controller: ConstantStepSize | PIController | None = None,
    gradient: str = "backprop",
    check_finite: bool = True,
) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` on a manifold from ``y0`` at ``t[0]`` to each ``t[i]``.

    Args:
        f: the vector field ``f(t, x)``, returning a tensor shaped like ``x``.
        y0: initial state, on ``manifold``.
        t: 1-D increasing or decreasing output times.
        solver: a ``RungeKutta`` or ``RKMK`` instance.
        manifold: a geoopt manifold (default Euclidean).
        controller: ``ConstantStepSize`` (default: one step per output interval) or
            ``PIController`` (adaptive; the solver needs an embedded error estimate).
        gradient: "backprop" (through every operation) or "checkpoint" (recompute in the
            backward pass: fixed steps keep about ``2 sqrt(n)`` states for ``n`` steps, see
            ``checkpointed_steps``; adaptive steps keep one per step). The continuous adjoint is
            ``solvers.odeint_adjoint``.
        check_finite: check the state after every step and raise ``NonFiniteError`` naming the
            step and time (one reduction per step).

    Returns:
        A ``Solution`` with ``ys`` of shape ``(len(t), *y0.shape)``, all on the manifold.
    """
    manifold = geoopt.Euclidean() if manifold is None else manifold
    controller = ConstantStepSize(steps=1) if controller is None else controller
    if gradient not in GRADIENT_MODES[:2]:
        hint = "; use solvers.odeint_adjoint for the adjoint" if gradient == "adjoint" else ""
        raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES[:2]}{hint}")
    if isinstance(controller, PIController) and not getattr(solver, "adaptive", False):
        raise ValueError(f"{solver!r} has no error estimate; use ConstantStepSize with it")
    if not isinstance(y0, torch.Tensor) or not y0.is_floating_point():
        raise ValueError("y0 must be a floating-point tensor")
    if not torch.isfinite(y0).all():
        raise ValueError("y0 contains NaN or infinite entries")
    ts = _times(t)
    check_on_manifold(y0, manifold)

    stats = SolveStats()
    field_ = _CountedField(f, stats)
    ys = [y0]
    x = y0
    # Without gradients there is nothing to recompute: checkpointing would only cost.
    gradient = gradient if torch.is_grad_enabled() else "backprop"
    if isinstance(controller, PIController):
        # The number of steps is not known ahead: checkpoint each one.
        checkpointed = partial(checkpoint, solver.step, use_reentrant=False)
        step = checkpointed if gradient == "checkpoint" else solver.step
        _adaptive(field_, ts, x, ys, step, solver, manifold, controller, stats, check_finite)
    else:
        for t0, t1 in zip(ts, ts[1:]):
            n = controller.grid(t0, t1)
            h = (t1 - t0) / n

            # Defaults bind this interval's values: a checkpoint reruns the step after the loop.
            def step(i, x, t0=t0, h=h, done=stats.steps):
                x = solver.step(field_, t0 + i * h, x, h, manifold)[0]
                if check_finite:
                    _check_finite(x, f"at step {done + i + 1} (t={t0 + (i + 1) * h:.6g}, h={h:.3g})")
                return x

            if gradient == "checkpoint":
                x = checkpointed_steps(step, x, n)
            else:
                for i in range(n):
                    x = step(i, x)
            stats.steps += n
            ys.append(x)
    # The backward pass reruns checkpointed steps through field_: they must not count as the solve's.
    field_.stats = SolveStats()
    return Solution(torch.tensor(ts, dtype=y0.dtype), torch.stack(ys), stats)


def _adaptive(f, ts, x, ys, step, solver, manifold, ctrl: PIController, stats, check_finite):
    direction = 1.0 if len(ts) < 2 or ts[1] > ts[0] else -1.0
    t = ts[0]
    k = solver.eval_field(f, torch.tensor(t, dtype=x.dtype), x, manifold)
    h = ctrl.initial_step(f, t, x, k, solver.order, manifold, direction)
    prev_error = 1.0
    k = k if solver.tableau.fsal else None
    for t_out in ts[1:]:
        while (t_out - t) * direction > 0:
            if stats.nfe >= ctrl.max_nfe:
                raise StepSizeError(
                    f"NFE cap {ctrl.max_nfe} reached at t={t:.6g} with step size {h:.3g} after "
                    f"{stats.steps} accepted and {stats.rejected} rejected steps"
                )
            last = (t_out - (t + h)) * direction <= 0
            h_try = t_out - t if last else h
            x_new, error, k_new = step(f, t, x, h_try, manifold, k)
            error_norm = ctrl.error_norm(error, x, x_new)
            accept, h_next, prev_error = ctrl.decide(error_norm, prev_error, h_try, solver.tableau.error_order)
            if accept:
                t = t_out if last else t + h_try
                x, k = x_new, k_new
                stats.steps += 1
                if check_finite:
                    _check_finite(x, f"at step {stats.steps} (t={t:.6g}, h={h_try:.3g})")
                # A step shortened to land on t_out says little about the step size to use next.
                h = max(h_next, h, key=abs) if last else h_next
            else:
                stats.rejected += 1
                h = h_next
            if abs(h) < ctrl.dt_min:
                raise StepSizeError(
                    f"step size {abs(h):.3g} fell below dt_min={ctrl.dt_min:g} at t={t:.6g} "
                    f"(scaled error {error_norm:.3g}, NFE {stats.nfe}): the field may blow up here"
                )
        ys.append(x)
