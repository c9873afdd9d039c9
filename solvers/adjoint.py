"""The continuous adjoint: gradients of a solve with memory flat in the number of steps.

The forward solve keeps no graph. The backward pass integrates, from the last output time back to
the first and piece by piece, the state ``y``, its adjoint ``a = dL/dy`` and the parameter
gradient ``g`` of the tangent field ``F(t, y) = proju(y, f(t, y))``::

    dy/dt = F,    da/dt = -a^T dF/dy,    dg/dt = -a^T dF/dtheta,

adding each output's incoming gradient to ``a`` at its time. ``F`` is tangent, so its exact flow
stays on the manifold and this is the exact flow's gradient; it differs from the gradient of the
discrete solve by the solver's error. The backward state ``(y, a, g)`` is one flat Euclidean
vector, stepped by the same tableau in relaxed mode (no manifold check applies to it).
"""

from __future__ import annotations

import geoopt
import torch
from torch import nn

from .controllers import PIController
from .runge_kutta import RungeKutta

__all__ = ["adjoint_solve"]


def adjoint_solve(term, plan, y0, ts, solver, controller, check, adjoint_params):
    """``integrate(..., gradient="adjoint")``: see the module docstring. Returns a ``Solution``."""
    from .solve import Solution, SolveStats, _adaptive, _fixed

    if not (isinstance(solver, RungeKutta) and solver.strict):
        raise ValueError(
            f"the adjoint is sound for a Runge-Kutta solver in strict mode (a tangent field), got {solver!r} on "
            f"{' '.join(repr(term(plan[0][0][2] if plan else 0)[1]).split())}; use gradient='checkpoint' for Lie-group, split or "
            f"relaxed solvers"
        )
    if adjoint_params is None:
        fields = [term(i)[0] for i in sorted({p for interval in plan for _, _, p in interval})]
        if not all(isinstance(f, nn.Module) for f in fields):
            raise ValueError(
                "gradient='adjoint' differentiates with respect to adjoint_params; the field is not an "
                "nn.Module, so pass them (e.g. adjoint_params=(A,)), as torchdiffeq.odeint_adjoint asks"
            )
        adjoint_params = tuple({id(p): p for f in fields for p in f.parameters()}.values())
    params = tuple(p for p in adjoint_params if p.requires_grad)  # frozen ones get no gradient
    run = _adaptive if isinstance(controller, PIController) else _fixed
    backward_solver = RungeKutta(solver.tableau, "relaxed")
    euclidean = geoopt.Euclidean()
    stats = SolveStats()

    def tangent(p):
        f, m = term(p)
        return lambda t, y: m.proju(y, f(t, y)), m

    def forward(y0):
        return torch.stack(run(tangent, plan, y0, solver, controller, stats, False, check))

    def backward(ys, grad_ys):
        shapes = [ys.shape[1:]] * 2 + [p.shape for p in params]
        sizes = [s.numel() for s in shapes]

        def augmented(p):
            F = tangent(p)[0]

            def field(t, z):
                y, a, *_ = (c.view(s) for c, s in zip(z.split(sizes), shapes))
                with torch.enable_grad():
                    y = y.detach().requires_grad_(True)
                    value = F(t, y)
                    # retain_graph: a field may close over tensors computed from the parameters
                    # outside it, whose graph every evaluation's product goes through again.
                    vjps = torch.autograd.grad(value, (y, *params), -a, allow_unused=True, retain_graph=True)
                parts = [value.detach()] + [torch.zeros_like(x) if v is None else v for v, x in zip(vjps, (y, *params))]
                return torch.cat([part.reshape(-1) for part in parts])

            return field, euclidean

        a = grad_ys[-1]
        g = [torch.zeros_like(p) for p in params]
        backward_plan = [[(b, a_, p) for a_, b, p in reversed(interval)] for interval in reversed(plan)]
        for j, interval in enumerate(backward_plan):
            z = torch.cat([c.reshape(-1) for c in (ys[len(plan) - j], a, *g)])
            z = run(augmented, [interval], z, backward_solver, controller, SolveStats(), False, check)[-1]
            _, a, *g = (c.view(s) for c, s in zip(z.split(sizes), shapes))
            a = a + grad_ys[len(plan) - j - 1]
        return a, g

    ys = _Adjoint.apply(forward, backward, y0, *params)
    return Solution(torch.tensor(ts, dtype=y0.dtype, device=y0.device), ys, stats)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, backward, y0, *params):
        with torch.no_grad():
            ys = forward(y0)
        ctx.backward_solve = backward
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        (ys,) = ctx.saved_tensors
        with torch.no_grad():
            grad_y0, grad_params = ctx.backward_solve(ys, grad_ys)
        return (None, None, grad_y0, *grad_params)
