"""torchdiffeq's calling convention: ``odeint``, ``odeint_adjoint`` and the torchdiffeq plugin."""

from __future__ import annotations

import geoopt
import torch

from .compat import is_torchdiffeq_adjoint_backward, torchdiffeq_solvers
from .defaults import ATOL, METHOD, RTOL
from .methods import METHODS, OPTIONS, make_controller, make_solver
from .solve import SolveStats, integrate

__all__ = ["odeint", "odeint_adjoint", "register_torchdiffeq"]

# Options of ours beside torchdiffeq's.
_OURS = ("mode", "gradient", "check_finite", "boundary", "stats")
# Prefix of our methods inside torchdiffeq, whose own "euler", "rk4", ... stay untouched.
TORCHDIFFEQ_PREFIX = "manifold_"


def odeint(func, y0, t, *, method=METHOD, manifold=None, rtol=RTOL, atol=ATOL, options=None, adjoint_params=None):
    """torchdiffeq-style solve on a manifold; returns a tensor ``(len(t), *y0.shape)``.

    Defaults are torchdiffeq's (``solvers.defaults``): dopri5, rtol 1e-7, atol 1e-9.

    Args:
        func: the field ``func(t, y)``.
        y0: initial state on ``manifold``; or a tuple of tensors, as torchdiffeq takes it, with
            ``manifold`` a tuple of one manifold (or None) per part: solved on their product and
            returned as a tuple of ``(len(t), *part.shape)`` tensors.
        t: output times (strictly monotone).
        method: one of ``METHODS``: euler, midpoint, heun, rk4, rkmk2, rkmk4 (fixed step) and
            bosh3, dopri5 (adaptive).
        manifold: a geoopt manifold (default Euclidean).
        rtol, atol: tolerances of the adaptive methods.
        options: torchdiffeq's ``step_size``, ``first_step``, ``max_num_steps`` and ours:
            ``steps`` (fixed steps per interval), ``dt_min``, ``max_nfe``, ``mode`` ("strict" or
            "relaxed"), ``gradient`` ("backprop", "checkpoint" or "adjoint"), ``check_finite``,
            ``boundary`` ("raise" or "warn"), ``stats`` (a ``SolveStats`` to fill in). Any other
            name is refused with this list.
        adjoint_params: with ``gradient="adjoint"``: the tensors to differentiate.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS) - set(_OURS))
    if unknown:
        raise ValueError(f"unknown options {unknown}; accepted: {', '.join([*OPTIONS, *_OURS])}")
    if not isinstance(options.get("stats"), (SolveStats, type(None))):
        raise TypeError(f"options['stats'] must be a solvers.SolveStats, which the solve fills in "
                        f"(stats = solvers.SolveStats()), not {type(options['stats']).__name__}")
    if isinstance(y0, (tuple, list)):
        return _tuple_odeint(func, tuple(y0), t, method, manifold, rtol, atol, options, adjoint_params)
    ours = {k: options.pop(k) for k in _OURS if k in options}
    solution = integrate(
        func,
        y0,
        t,
        solver=make_solver(method, manifold, ours.get("mode", "strict")),
        manifold=manifold,
        controller=make_controller(method, rtol, atol, options),
        gradient=ours.get("gradient", "backprop"),
        check_finite=ours.get("check_finite", True),
        boundary=ours.get("boundary", "raise"),
        adjoint_params=adjoint_params,
    )
    if ours.get("stats") is not None:
        vars(ours["stats"]).update(vars(solution.stats))
    return solution.ys


def _tuple_odeint(func, y0: tuple, t, method, manifold, rtol, atol, options, adjoint_params):
    """A tuple state, as torchdiffeq takes it: solved as one flat state on the product of each
    part's manifold (``manifold`` a tuple of them, one for all, or None for Euclidean parts)."""
    if not y0 or not all(isinstance(y, torch.Tensor) and y.is_floating_point() for y in y0):
        raise ValueError("a tuple y0 must hold floating-point tensors")
    parts = manifold if isinstance(manifold, (tuple, list)) else (manifold,) * len(y0)
    if len(parts) != len(y0):
        raise ValueError(f"y0 has {len(y0)} parts but manifold has {len(parts)}: give one per part")
    shapes = [y.shape for y in y0]
    product = geoopt.ProductManifold(*((geoopt.Euclidean() if m is None else m, s) for m, s in zip(parts, shapes)))
    flat = torch.cat([y.reshape(-1) for y in y0])

    def unflatten(x):
        return tuple(product.take_submanifold_value(x, i) for i in range(len(shapes)))

    def field(t, x):
        out = func(t, unflatten(x))
        if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
            raise ValueError(f"the field must return a tuple of {len(shapes)} tensors shaped like y0's parts")
        return torch.cat([o.reshape(-1) for o in out])

    if adjoint_params is None and isinstance(func, torch.nn.Module):  # the wrapper hides func's parameters
        adjoint_params = tuple(func.parameters())
    ys = odeint(field, flat, t, method=method, manifold=product, rtol=rtol, atol=atol, options=options,
                adjoint_params=adjoint_params)
    return tuple(torch.stack(parts) for parts in zip(*(unflatten(y) for y in ys)))


def odeint_adjoint(func, y0, t, *, method=METHOD, manifold=None, rtol=RTOL, atol=ATOL, options=None,
                   adjoint_params=None):
    """``odeint`` with ``gradient="adjoint"``: gradients by the continuous adjoint, memory flat in
    the steps (``solvers.adjoint``). Sound for Runge-Kutta methods in strict mode; refused for
    relaxed mode and Lie-group methods.

    Args:
        adjoint_params: the tensors to differentiate (default ``func``'s parameters; required
            when ``func`` is not an ``nn.Module``).
        Others as ``odeint``.
    """
    options = dict(options or {})
    if options.pop("gradient", "adjoint") != "adjoint":
        raise ValueError("odeint_adjoint computes its own gradients; do not set 'gradient'")
    return odeint(func, y0, t, method=method, manifold=manifold, rtol=rtol, atol=atol,
                  options={**options, "gradient": "adjoint"}, adjoint_params=adjoint_params)


def _plugin(method):
    class TorchdiffeqSolver:
        """torchdiffeq solver class that runs one of our methods (see ``register_torchdiffeq``)."""

        def __init__(self, func, y0, rtol, atol, norm=None, manifold=None, **options):
            if is_torchdiffeq_adjoint_backward(func):
                # Its adjoint differentiates the field as given, not its tangent projection, and
                # its augmented state is no point of the manifold: its gradients would be wrong.
                raise ValueError(
                    f"torchdiffeq.odeint_adjoint's backward pass cannot run {TORCHDIFFEQ_PREFIX + method!r}: it "
                    f"differentiates the field off the manifold; use solvers.odeint_adjoint, which solves the "
                    f"adjoint of the tangent field"
                )
            if manifold is None:
                raise ValueError(
                    f"method {TORCHDIFFEQ_PREFIX + method!r} needs options={{'manifold': M, ...}}; "
                    f"for Euclidean space use torchdiffeq's own {method!r}"
                )
            self.func, self.y0, self.rtol, self.atol = func, y0, rtol, atol
            self.manifold, self.options = manifold, options

        @classmethod
        def valid_callbacks(cls):
            # torchdiffeq asks every solver class which callbacks it honours; ours honour none.
            return set()

        def integrate(self, t):
            rtol = float(self.rtol) if torch.is_tensor(self.rtol) else self.rtol
            atol = float(self.atol) if torch.is_tensor(self.atol) else self.atol
            return odeint(
                self.func, self.y0, t, method=method, manifold=self.manifold,
                rtol=rtol, atol=atol, options=self.options,
            )

    TorchdiffeqSolver.__name__ = f"Manifold_{method}"
    return TorchdiffeqSolver


def register_torchdiffeq() -> tuple[str, ...]:
    """Make ``torchdiffeq.odeint`` accept ``manifold_<method>`` for our methods; call it once.

    Pass the manifold and our options through torchdiffeq's ``options``, e.g.
    ``torchdiffeq.odeint(f, y0, t, method="manifold_rk4", options={"manifold": Sphere(), "step_size": 0.1})``.
    For gradients with flat memory use ``solvers.odeint_adjoint``, which projects the field onto
    the tangent space itself: torchdiffeq's own ``odeint_adjoint`` would solve the adjoint of the
    field as given, in R^n, so our names refuse to run its backward pass (its forward pass may
    use them, with ``adjoint_method`` one of torchdiffeq's own). Idempotent; returns the registered
    names.
    """
    registry = torchdiffeq_solvers()
    names = []
    for method in METHODS:
        name = TORCHDIFFEQ_PREFIX + method
        if name not in registry:
            registry[name] = _plugin(method)
        names.append(name)
    return tuple(names)
