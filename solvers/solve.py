"""``integrate``: the one solve loop. Every solve in the project, a model's included, runs here.

It plans the steps (fixed) or lets the controller choose them (adaptive), restarts at the breaks
of a ``Piecewise`` field, counts field evaluations, checks the state after every step, and
computes gradients by backprop, two-level checkpointing or the continuous adjoint.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
import weakref
from dataclasses import dataclass, field

import geoopt
import torch
from torch.utils.checkpoint import checkpoint

from manifolds import at_boundary, check_contract

from .base import Piecewise, Term
from .checkpointing import checkpointed_steps
from .compat import upstream_defect
from .controllers import ConstantStepSize, PIController
from .errors import BoundaryError, NonFiniteError, OffManifoldError, StepSizeError, describe

__all__ = ["BOUNDARY_ACTIONS", "GRADIENT_MODES", "Solution", "SolveStats", "check_on_manifold", "integrate"]

GRADIENT_MODES = ("backprop", "checkpoint", "adjoint")
BOUNDARY_ACTIONS = ("raise", "warn")


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


class _Counter:
    """Counts the field evaluations of one step and checks each value's shape.

    One is made inside each step, so its count is a local value that the step returns: nothing
    escapes a checkpoint (``torch.compile`` traces it whole) and the backward pass's reruns add
    nothing to the solve's count.
    """

    def __init__(self):
        self.n = 0

    def wrap(self, f):
        if isinstance(f, (tuple, list)):  # a split field: count every term's evaluations
            return tuple(Term(self.wrap(term.field), term.manifold) for term in f)

        def counted(t, x):
            self.n += 1
            out = f(t, x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"the field returned {got} at t={float(t):.6g}; it must return a tensor shaped "
                    f"like the state, {tuple(x.shape)}"
                )
            return out

        return counted


def _times(t) -> list[float]:
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            raise ValueError("gradients with respect to the output times are not supported: pass t.detach()")
        if t.dim() != 1:
            raise ValueError(f"t must be a 1-D tensor of output times, got shape {tuple(t.shape)}")
        t = t.tolist()
    ts = [float(x) for x in t]  # a list of numbers (what models pass) stays off the traced graph
    if not ts:
        raise ValueError("t must hold at least one output time")
    if not all(math.isfinite(x) for x in ts):
        raise ValueError(f"t must be finite, got {ts}")
    diffs = [b - a for a, b in zip(ts, ts[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {ts}")
    return ts


def check_on_manifold(y0: torch.Tensor, manifold) -> None:
    """Raise ``OffManifoldError`` (saying by how much) if ``y0`` is off ``manifold``.

    The tolerance is float32's whatever the dtype: a point made in float32 and cast to float64 is
    on the manifold to float32's precision, and the first retraction takes it the rest of the way.
    """
    tol = 1e-2 if y0.dtype in (torch.float16, torch.bfloat16) else 1e-5
    try:
        ok, reason = manifold.check_point_on_manifold(y0.detach(), explain=True, atol=tol, rtol=tol)
    except RuntimeError as error:  # e.g. geoopt's Lorentz keeps its curvature in float32
        raise ValueError(
            f"{manifold!r} cannot check a {y0.dtype} point ({' '.join(str(error).split())[:120]}); if the manifold "
            f"holds parameters of another dtype, move it to y0's: manifold.to({y0.dtype})"
        ) from error
    if not ok:
        gap = (manifold.projx(y0.detach()) - y0.detach()).abs().max().item()
        raise OffManifoldError(
            f"y0 is not on {manifold!r}: {reason}; projx moves it by up to {gap:.3g}. "
            f"Project it first with manifold.projx(y0)."
        )


class _StateCheck:
    """The checks on the state after every accepted step: finite, and off any numerical boundary.

    torch.compile traces the solve without them: reading a value back would break the graph at
    every step.
    """

    def __init__(self, check_finite: bool, boundary: str):
        if boundary not in BOUNDARY_ACTIONS:
            raise ValueError(f"unknown boundary action {boundary!r}; expected one of {BOUNDARY_ACTIONS}")
        self.check_finite, self.boundary, self.warned = check_finite, boundary, False

    def __call__(self, x: torch.Tensor, manifold, where: str) -> None:
        if torch.compiler.is_compiling():
            return
        # One sum costs far less per step than an elementwise isfinite (~40x at 256 x 256 on CPU).
        # It is non-finite whenever an entry is; a false alarm from finite entries overflowing the
        # sum is cleared by the exact check.
        if self.check_finite and not math.isfinite(x.detach().sum().item()) and not torch.isfinite(x).all():
            raise NonFiniteError(f"the state became non-finite {where}: {describe(x)}")
        if at_boundary(manifold, x):  # False at once for manifolds without a boundary
            message = (
                f"the state reached the numerical boundary of {manifold!r} {where}: its projx pins points "
                f"there, so the solve would go on from a point the ODE never reached; shorten the horizon "
                f"or slow the field, or pass boundary='warn' to go on"
            )
            if self.boundary == "raise":
                raise BoundaryError(message)
            if not self.warned:  # once per solve, not once per step
                warnings.warn(message, RuntimeWarning, stacklevel=4)
                self.warned = True


_EUCLIDEAN = geoopt.Euclidean()
# The manifolds whose contract has been checked, with the (dtype, strict) it was checked for: a
# model solves on the same manifolds at every forward pass, and the contract does not change.
_CONTRACTS = weakref.WeakKeyDictionary()


def _check_contract_once(manifold, y0: torch.Tensor, strict: bool) -> None:
    key = (y0.dtype, strict)
    checked = _CONTRACTS.setdefault(manifold, set())
    if key not in checked:
        check_contract(manifold, y0, strict=strict)
        checked.add(key)


def _plan(ts: list[float], pieces: Piecewise) -> list[list[tuple[float, float, int]]]:
    """Per output interval, the intervals between knots (output times and breaks): ``(a, b, piece)``."""
    lo, hi = min(ts), max(ts)
    slack = 1e-9 * max(1.0, abs(lo), abs(hi))
    if pieces.breaks[0] > lo + slack or pieces.breaks[-1] < hi - slack:
        raise ValueError(
            f"the Piecewise field covers [{pieces.breaks[0]:g}, {pieces.breaks[-1]:g}], not the output "
            f"times [{lo:g}, {hi:g}]"
        )
    plan = []
    for a, b in zip(ts, ts[1:]):
        inner = [x for x in pieces.breaks if min(a, b) + slack < x < max(a, b) - slack]
        knots = [a, *(inner if b > a else reversed(inner)), b]
        plan.append([(p, q, pieces.index(min(p, q), max(p, q))) for p, q in zip(knots, knots[1:])])
    return plan


def integrate(
    f,
    y0: torch.Tensor,
    t,
    *,
    solver,
    manifold: geoopt.Manifold | None = None,
    controller: ConstantStepSize | PIController | None = None,
    gradient: str = "backprop",
    check_finite: bool = True,
    boundary: str = "raise",
    adjoint_params=None,
) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` on a manifold from ``y0`` at ``t[0]`` to each ``t[i]``.

    Args:
        f: the field: a callable ``f(t, x)`` returning a tensor shaped like ``x``; a sequence of
            ``Term`` for a ``Split`` solver; or a ``Piecewise`` field.
        y0: initial state, on ``manifold`` (checked when the solver is strict).
        t: 1-D increasing or decreasing output times.
        solver: a ``Solver``: ``RungeKutta``, ``RKMK``, ``Split``, ...
        manifold: a geoopt manifold (default Euclidean); a ``Piecewise`` field's terms may name
            their own.
        controller: ``ConstantStepSize`` (default: one step per interval) or ``PIController``
            (adaptive; the solver needs an error estimate).
        gradient: "backprop" (through every operation), "checkpoint" (recompute in the backward
            pass: fixed steps keep about ``2 sqrt(n)`` states for ``n`` steps, see
            ``checkpointed_steps``; adaptive steps keep one per step) or "adjoint" (the continuous
            adjoint: memory flat in the steps; strict Runge-Kutta solvers only).
        check_finite: check y0 and the state after every step and raise ``NonFiniteError``
            naming the step and time (one reduction per step).
        boundary: what to do when the state reaches a manifold's numerical boundary (the clip
            radius of geoopt's Poincare ball, where projx pins it): "raise" ``BoundaryError``
            naming the step and time, or "warn" once and go on.
        adjoint_params: with ``gradient="adjoint"``, the tensors to differentiate (default: the
            parameters of the field when it is an ``nn.Module``).

    Returns:
        A ``Solution`` with ``ys`` of shape ``(len(t), *y0.shape)``, all on the manifold.
    """
    controller = ConstantStepSize(steps=1) if controller is None else controller
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES}")
    adaptive = isinstance(controller, PIController)
    if adaptive and getattr(solver, "error_order", None) is None:
        raise ValueError(f"{solver!r} has no error estimate; use ConstantStepSize with it")
    if not isinstance(y0, torch.Tensor) or not y0.is_floating_point():
        raise ValueError("y0 must be a floating-point tensor")
    if y0.numel() == 0:
        raise ValueError(f"y0 is empty (shape {tuple(y0.shape)}): there is nothing to integrate")
    ts = _times(t)
    if isinstance(f, Piecewise):
        pieces = f
    else:
        ends = (min(ts), max(ts)) if len(ts) > 1 else (ts[0], ts[0] + 1.0)
        pieces = Piecewise(ends, lambda i: Term(f, manifold))
    plan = _plan(ts, pieces)
    default = _EUCLIDEAN if manifold is None else manifold

    def term(i: int):
        field_, m = pieces.piece(i)
        return field_, (default if m is None else m)

    check = _StateCheck(check_finite, boundary)
    first_piece = plan[0][0][2] if plan else 0  # with a single output time there is nothing to plan
    if not torch.compiler.is_compiling():  # data-dependent checks would break the traced graph
        # The sum first: far cheaper than an elementwise check, and non-finite whenever an entry is.
        if check_finite and not math.isfinite(y0.detach().sum().item()) and not torch.isfinite(y0).all():
            raise NonFiniteError(f"y0 contains NaN or infinite entries: {describe(y0)}")
        first = term(first_piece)[1]
        if solver.strict:
            check_on_manifold(y0, first)
        _check_contract_once(first, y0, solver.strict)

    if gradient == "adjoint":
        from .adjoint import adjoint_solve  # the adjoint's solves come back here: import on use

        return adjoint_solve(term, plan, y0, ts, solver, controller, check, adjoint_params)
    # Without gradients there is nothing to recompute: checkpointing would only cost.
    recompute = gradient == "checkpoint" and torch.is_grad_enabled()
    stats = SolveStats()
    run = _adaptive if adaptive else _fixed
    ys = torch.stack(run(term, plan, y0, solver, controller, stats, recompute, check))
    defect = None if torch.compiler.is_compiling() else upstream_defect(term(first_piece)[1], gradient, not adaptive)
    if defect is not None and ys.requires_grad:  # a clear error before autograd reaches the defect
        ys.register_hook(partial(_refuse, defect))
    return Solution(torch.tensor(ts, dtype=y0.dtype, device=y0.device), ys, stats)


def _refuse(message: str, grad):
    raise ValueError(message)


def _fixed(term, plan, x, solver, controller: ConstantStepSize, stats, recompute, check):
    counts = [[controller.grid(a, b) for a, b, _ in interval] for interval in plan]
    total = sum(map(sum, counts))
    if total > controller.max_steps:
        raise ValueError(
            f"this fixed-step solve would take {total:,} steps, more than max_steps={controller.max_steps:,}; "
            f"use a larger step size or fewer steps, or raise max_steps if you mean it"
        )
    ys = [x]
    for interval, ns in zip(plan, counts):
        steps = [(a + i * (b - a) / n, (b - a) / n, p) for (a, b, p), n in zip(interval, ns) for i in range(n)]

        # Defaults bind this interval's values: a checkpoint reruns the step after the loop.
        def advance(i, x, steps=steps, done=stats.steps):
            t0, h, p = steps[i]
            f, m = term(p)
            count = _Counter()
            x = solver.step(count.wrap(f), t0, x, h, m).y
            check(x, m, f"at step {done + i + 1} (t={t0 + h:.6g}, h={h:.3g})")
            return x, count.n

        if recompute:
            x, nfe = checkpointed_steps(advance, x, len(steps))
        else:
            nfe = 0
            for i in range(len(steps)):
                x, n = advance(i, x)
                nfe += n
        stats.steps += len(steps)
        stats.nfe += nfe
        ys.append(x)
    return ys


def _adaptive(term, plan, x, solver, ctrl: PIController, stats, recompute, check):
    """Steps chosen by the controller. They restart at breaks and land on the last output time;
    the output times between are read off each accepted step's dense output (projected onto the
    manifold), or landed on when the solver has none."""
    outputs = [interval[-1][1] for interval in plan]  # the times after t[0]
    segments = []  # the knot intervals, merged where the field stays the same: (a, b, piece)
    for a, b, p in (k for interval in plan for k in interval):
        if segments and segments[-1][2] == p:
            a = segments.pop()[0]
        segments.append((a, b, p))

    def attempt(f, t, x, h, m, k):
        count = _Counter()
        return (*solver.step(count.wrap(f), t, x, h, m, k), count.n)

    def evaluate(fn):
        count = _Counter()
        out = fn(count)
        stats.nfe += count.n
        return out

    step = (lambda *a: checkpoint(attempt, *a, use_reentrant=False)) if recompute else attempt
    ys, h, prev_error, dense_ok, j = [x], None, 1.0, True, 0
    for a, b, p in segments:
        direction = 1.0 if b > a else -1.0
        t = a
        # Each segment is a new field (they are merged by piece): start afresh from its value here.
        f, m = term(p)
        k = evaluate(lambda c: solver.field_value(c.wrap(f), torch.tensor(t, dtype=x.dtype), x, m))
        if not torch.isfinite(k).all():
            raise NonFiniteError(f"the field is non-finite at t={t:.6g}, where the solve (re)starts: {describe(k)}")
        if h is None:
            h = evaluate(lambda c: ctrl.initial_step(c.wrap(f), t, x, k, solver.order, m, direction))
        k = k if solver.fsal else None
        while (b - t) * direction > 0:
            if stats.nfe >= ctrl.max_nfe or stats.steps >= ctrl.max_steps:
                cap = f"NFE cap {ctrl.max_nfe}" if stats.nfe >= ctrl.max_nfe else f"step cap {ctrl.max_steps}"
                raise StepSizeError(
                    f"{cap} reached at t={t:.6g} with step size {h:.3g} after {stats.steps} accepted and "
                    f"{stats.rejected} rejected steps"
                )
            # Land on the segment's end, and on output times too when the solver has no dense output.
            target = b if dense_ok or (outputs[j] - b) * direction >= 0 else outputs[j]
            last = (target - (t + h)) * direction <= 0
            h_try = target - t if last else h
            x_new, error, k_new, dense, n = step(f, t, x, h_try, m, k)
            stats.nfe += n
            error_norm = ctrl.error_norm(error, x, x_new)
            accept, h_next, prev_error = ctrl.decide(error_norm, prev_error, h_try, solver.error_order)
            t_new = target if last else t + h_try
            if accept and dense is None and j < len(outputs) and (outputs[j] - t_new) * direction < 0:
                dense_ok, accept = False, False  # no dense output: redo the step, landing on outputs
            if accept:
                while j < len(outputs) and (outputs[j] - t_new) * direction < 0:
                    ys.append(m.projx(dense((outputs[j] - t) / h_try)))  # inside the step
                    j += 1
                if j < len(outputs) and outputs[j] == t_new:
                    ys.append(x_new)
                    j += 1
                t, x, k = t_new, x_new, k_new
                stats.steps += 1
                check(x, m, f"at step {stats.steps} (t={t:.6g}, h={h_try:.3g})")
                # A step shortened to land on a knot says little about the step size to use next.
                h = max(h_next, h, key=abs) if last else h_next
            else:
                stats.rejected += 1
                h = h_next
            if abs(h) < ctrl.dt_min:
                if not math.isfinite(error_norm):
                    raise NonFiniteError(
                        f"every trial step at t={t:.6g} came back non-finite, down to step size "
                        f"{abs(h_try):.3g} (NFE {stats.nfe}): the field returns NaN or inf next to this state"
                    )
                raise StepSizeError(
                    f"step size {abs(h):.3g} fell below dt_min={ctrl.dt_min:g} at t={t:.6g} "
                    f"(scaled error {error_norm:.3g}, NFE {stats.nfe}): the field may blow up here"
                )
    return ys
