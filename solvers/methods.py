"""Method names, the torchdiffeq-compatible ``odeint``/``odeint_adjoint``, and the plugin.

Names belong here, at the edge; the library underneath works with solver objects.
"""

from __future__ import annotations

import importlib

import geoopt
import torch
import torchdiffeq
from torch import nn

from manifolds import LowRankSphereAction, StiefelAction

from .controllers import ConstantStepSize, PIController
from .lie_group import RKMK
from .runge_kutta import RungeKutta
from .solve import check_on_manifold, integrate
from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, RK4

__all__ = ["METHODS", "make_solver", "odeint", "odeint_adjoint", "register_torchdiffeq"]

_TABLEAUS = {"euler": EULER, "midpoint": MIDPOINT, "heun": HEUN, "rk4": RK4, "bosh3": BOSH3, "dopri5": DOPRI5}
_LIE = {"rkmk2": HEUN, "rkmk4": RK4}
METHODS = tuple(_TABLEAUS) + tuple(_LIE)
ADAPTIVE = ("bosh3", "dopri5")
# Prefix of our methods inside torchdiffeq, whose own "euler", "rk4", ... stay untouched.
TORCHDIFFEQ_PREFIX = "manifold_"


def _action_for(manifold):
    if isinstance(manifold, geoopt.Stiefel):
        return StiefelAction(manifold)
    if isinstance(manifold, geoopt.Sphere):
        return LowRankSphereAction(manifold)  # exact, and O(n) per token instead of SphereAction's O(n^3)
    raise ValueError(
        f"Lie-group methods need a manifold with an SO(n) action (a Sphere or a Stiefel manifold), "
        f"got {manifold!r}"
    )


def make_solver(method: str, manifold=None, mode: str = "strict"):
    """The solver object for a method name (see ``METHODS``)."""
    if method in _TABLEAUS:
        return RungeKutta(_TABLEAUS[method], mode)
    if method in _LIE:
        return RKMK(_LIE[method], _action_for(manifold))
    raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")


def _controller(method, rtol, atol, options):
    if method in ADAPTIVE:
        return PIController(
            rtol=rtol,
            atol=atol,
            dt0=options.get("first_step"),
            dt_min=options.get("dt_min", 1e-12),
            max_nfe=options.get("max_nfe", 100_000),
        )
    if "step_size" in options or "steps" in options:
        return ConstantStepSize(step_size=options.get("step_size"), steps=options.get("steps"))
    return ConstantStepSize(steps=1)


_OPTIONS = {"step_size", "steps", "mode", "gradient", "check_finite", "first_step", "dt_min", "max_nfe", "stats"}


def _check_options(options):
    unknown = set(options) - _OPTIONS - {"manifold"}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(_OPTIONS | {'manifold'})}")


def odeint(func, y0, t, *, method="rk4", manifold=None, rtol=1e-7, atol=1e-9, options=None):
    """torchdiffeq-style solve on a manifold; returns a tensor ``(len(t), *y0.shape)``.

    Args:
        func: the field ``func(t, y)``.
        y0: initial state on ``manifold``.
        t: output times (strictly monotone).
        method: one of ``METHODS``: euler, midpoint, heun, rk4, rkmk2, rkmk4 (fixed step) and
            bosh3, dopri5 (adaptive).
        manifold: a geoopt manifold (default Euclidean).
        rtol, atol: tolerances of the adaptive methods.
        options: ``step_size`` or ``steps`` (fixed-step methods; default one step per output
            interval), ``mode`` ("strict" or "relaxed"), ``gradient`` ("backprop" or
            "checkpoint"), ``check_finite``, ``first_step``, ``dt_min``, ``max_nfe``, and
            ``stats`` (a ``SolveStats`` to fill in).
    """
    options = dict(options or {})
    _check_options(options)
    manifold = options.pop("manifold", manifold)
    solver = make_solver(method, manifold, options.get("mode", "strict"))
    solution = integrate(
        func,
        y0,
        t,
        solver=solver,
        manifold=manifold,
        controller=_controller(method, rtol, atol, options),
        gradient=options.get("gradient", "backprop"),
        check_finite=options.get("check_finite", True),
    )
    if options.get("stats") is not None:
        vars(options["stats"]).update(vars(solution.stats))
    return solution.ys


class _Tangent(nn.Module):
    """The field projected onto the tangent space: the ODE whose adjoint we solve."""

    def __init__(self, func, manifold):
        super().__init__()
        self.func = func
        self.manifold = manifold

    def forward(self, t, y):
        return self.manifold.proju(y, self.func(t, y))


def odeint_adjoint(
    func, y0, t, *, method="rk4", manifold=None, rtol=1e-7, atol=1e-9, options=None, adjoint_params=None
):
    """``odeint`` whose gradients come from the continuous adjoint (memory flat in the steps).

    Sound for Runge-Kutta methods on the projected field ``proju(x, f(t, x))``: its exact flow
    stays on the manifold, so the adjoint ODE (solved backwards in the ambient space with the same
    method and step options) gives the gradient of the exact flow. The returned gradient differs
    from the gradient of the discrete forward solve by the solver's error. Refused where it is not
    sound: relaxed mode (the discrete map's limit is not the ODE of ``f``) and Lie-group methods
    (their steps are not the ambient ODE's).

    Args:
        func: the field; an ``nn.Module``, or give ``adjoint_params``.
        adjoint_params: the tensors to differentiate (default ``func``'s parameters).
        Others as ``odeint``.
    """
    options = dict(options or {})
    _check_options(options)
    manifold = options.pop("manifold", manifold)
    if options.pop("mode", "strict") != "strict":
        raise ValueError("the adjoint is only sound in strict mode (tangent field)")
    if method in _LIE:
        raise ValueError(f"the adjoint is not offered for Lie-group method {method!r}; use gradient='checkpoint'")
    if options.pop("gradient", "backprop") != "backprop":
        raise ValueError("odeint_adjoint computes its own gradients; do not set 'gradient'")
    make_solver(method)  # unknown names fail here, before any work
    manifold = geoopt.Euclidean() if manifold is None else manifold
    check_on_manifold(y0, manifold)
    register_torchdiffeq()
    tangent = _Tangent(func, manifold)
    if adjoint_params is None:
        adjoint_params = tuple(p for p in tangent.parameters())
    stats = options.get("stats")
    backward_options = {k: v for k, v in options.items() if k != "stats"}
    return torchdiffeq.odeint_adjoint(
        tangent,
        y0,
        torch.as_tensor(t, dtype=y0.dtype),
        rtol=rtol,
        atol=atol,
        method=TORCHDIFFEQ_PREFIX + method,
        # The field is already tangent: relaxed mode skips a second projection.
        options={**backward_options, "manifold": manifold, "mode": "relaxed", "stats": stats},
        # The backward state is torchdiffeq's flat augmented vector: it lives in R^n.
        adjoint_options={**backward_options, "mode": "relaxed"},
        adjoint_params=adjoint_params,
    )


def _plugin(method):
    class TorchdiffeqSolver:
        """torchdiffeq solver class that runs one of our methods (see ``register_torchdiffeq``)."""

        def __init__(self, func, y0, rtol, atol, norm=None, manifold=None, **options):
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
    """Make ``torchdiffeq.odeint``/``odeint_adjoint`` accept ``manifold_<method>`` for our methods.

    Pass the manifold and our options through torchdiffeq's ``options``, e.g.
    ``torchdiffeq.odeint(f, y0, t, method="manifold_rk4", options={"manifold": Sphere(), "step_size": 0.1})``.
    With ``torchdiffeq.odeint_adjoint`` give ``adjoint_options`` without the manifold: the backward
    state is torchdiffeq's flat augmented vector. The backward pass then solves the adjoint of the
    field as given, in R^n, so the field must already be tangent (return ``proju(x, f)``): a normal
    part gives silently wrong gradients. ``solvers.odeint_adjoint`` does that projection itself.
    Relies on ``torchdiffeq._impl.odeint.SOLVERS`` (torchdiffeq 0.2.x, pinned in pyproject).
    Idempotent; returns the registered names.
    """
    # The module, not the function of the same name that torchdiffeq._impl exports.
    registry = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    names = []
    for method in METHODS:
        name = TORCHDIFFEQ_PREFIX + method
        if name not in registry:
            registry[name] = _plugin(method)
        names.append(name)
    return tuple(names)
