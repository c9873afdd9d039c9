"""Method names: where strings such as ``"rk4"`` become solver and controller objects.

Names belong at the edges (``odeint``, YAML configs, ``SVFlowLM(method=...)``); everything
underneath works with objects. This is the one place that maps one to the other.
"""

from __future__ import annotations

import geoopt

from manifolds import LowRankSphereAction, StiefelAction

from .controllers import ConstantStepSize, PIController
from .defaults import ATOL, RTOL
from .lie_group import RKMK
from .runge_kutta import RungeKutta
from .splitting import Split
from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, RK4

__all__ = ["ADAPTIVE", "METHODS", "OPTIONS", "make_controller", "make_solver"]

_TABLEAUS = {"euler": EULER, "midpoint": MIDPOINT, "heun": HEUN, "rk4": RK4, "bosh3": BOSH3, "dopri5": DOPRI5}
_LIE = {"rkmk2": HEUN, "rkmk4": RK4}
METHODS = tuple(_TABLEAUS) + tuple(_LIE)
ADAPTIVE = ("bosh3", "dopri5")

# The options a method name takes, torchdiffeq's spelling where it has one.
OPTIONS = {
    "step_size": "fixed steps: the largest step",
    "steps": "fixed steps: the number of steps per interval",
    "first_step": "adaptive: the size of the first step",
    "dt_min": "adaptive: the step floor",
    "max_nfe": "adaptive: the cap on field evaluations",
    "max_num_steps": "the cap on steps",
}


def _action_for(manifold):
    if isinstance(manifold, geoopt.Stiefel):
        return StiefelAction(manifold)
    if isinstance(manifold, geoopt.Sphere):
        return LowRankSphereAction(manifold)  # exact, and O(n) per token instead of SphereAction's O(n^3)
    raise ValueError(
        f"Lie-group methods need a manifold with an SO(n) action (a Sphere or a Stiefel manifold), "
        f"got {manifold!r}"
    )


def make_solver(method: str, manifold=None, mode: str = "strict", splitting: str | None = None):
    """The solver object for a method name (see ``METHODS``), split by ``splitting`` if given."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if method in _TABLEAUS:
        solver = RungeKutta(_TABLEAUS[method], mode)
    else:
        solver = RKMK(_LIE[method], _action_for(manifold))
    return solver if splitting is None else Split(solver, splitting)


def make_controller(method: str, rtol: float = RTOL, atol: float = ATOL, options: dict | None = None):
    """The step-size controller for a method name and torchdiffeq-style ``options`` (see ``OPTIONS``)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        known = "; ".join(f"{k} ({v})" for k, v in OPTIONS.items())
        raise ValueError(f"unknown options {unknown}; accepted: {known}")
    caps = {} if "max_num_steps" not in options else {"max_steps": options["max_num_steps"]}
    if method in ADAPTIVE:
        fixed = sorted({"step_size", "steps"} & set(options))
        if fixed:
            raise ValueError(f"{method} chooses its own steps: {fixed} apply to fixed-step methods only")
        extra = {k: options[k] for k in ("dt_min", "max_nfe") if k in options}
        return PIController(rtol=rtol, atol=atol, dt0=options.get("first_step"), **extra, **caps)
    adaptive_only = sorted({"first_step", "dt_min", "max_nfe"} & set(options))
    if adaptive_only:
        raise ValueError(f"{method} takes fixed steps: {adaptive_only} apply to adaptive methods only")
    if "step_size" in options or "steps" in options:
        return ConstantStepSize(step_size=options.get("step_size"), steps=options.get("steps"), **caps)
    return ConstantStepSize(steps=1, **caps)
