"""Method names: where strings such as ``"rk4"`` become solver and controller objects.

Names belong at the edges (``odeint``, YAML configs, ``SVFlowLM(method=...)``); everything
underneath works with objects. This is the one place that maps one to the other.
"""

from __future__ import annotations

import geoopt

from manifolds import LayerNormSphere, LowRankSphereAction, SphereExact, Stiefel, StiefelAction

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


def _describe(manifold) -> str:
    """The manifold in a refusal: its class (a repr need not say it) and its repr, on one line."""
    if manifold is None:
        return "Euclidean (manifold=None)"
    return f"{type(manifold).__name__} ({' '.join(repr(manifold).split())})"


def _action_for(method: str, manifold):
    """The SO(n) action an RKMK method steps with on ``manifold``, or ``ValueError`` saying why there is none."""
    refuse = f"{method} is refused on {_describe(manifold)}: "
    if isinstance(manifold, Stiefel):  # ours, and SpecialOrthogonal: projx and retr differentiate finitely
        return StiefelAction(manifold)
    if isinstance(manifold, geoopt.Stiefel):
        raise ValueError(
            refuse + "each RKMK step ends with the manifold's projx, and geoopt's Stiefel projx is an SVD whose "
            "backward is NaN at orthonormal matrices (and the canonical Stiefel's proju is not a projection); "
            "use manifolds.Stiefel (or manifolds.SpecialOrthogonal for SO(n)), the same manifold with the "
            "Euclidean metric and finite derivatives"
        )
    if isinstance(manifold, geoopt.Sphere):
        # A sphere within a subspace: ours within the mean-zero plane, geoopt's with an intersection.
        if isinstance(manifold, LayerNormSphere) or getattr(manifold, "projector", None) is not None:
            raise ValueError(
                refuse + "the sphere's SO(n) action turns x towards the field value without removing the part "
                "that leaves its subspace (the mean-zero plane of LayerNormSphere), so the solve converges to "
                "another ODE; use a Runge-Kutta method (euler, midpoint, heun, rk4, bosh3, dopri5), whose strict "
                "mode projects onto the subspace"
            )
        return LowRankSphereAction(manifold)  # exact, and O(n) per token instead of SphereAction's O(n^3)
    raise ValueError(
        refuse + "Lie-group methods need a manifold with an SO(n) action (manifolds.Sphere, geoopt.Sphere, "
        "manifolds.Stiefel or manifolds.SpecialOrthogonal), and this one has none; use a Runge-Kutta method "
        "(euler, midpoint, heun, rk4, bosh3, dopri5)"
    )


# A Runge-Kutta step ends with retr(x, u), u = h sum_i b_i k_i the ambient increment (tangent only up to
# O(h^2)). The tableau's order survives when retr maps x + u onto the manifold and fixes the manifold's
# points (a projection of x + u: Sphere, Stiefel, SO(n), geoopt's PoincareBall and Stereographic,
# Euclidean). These retractions are other maps, and cap every tableau at the order given.
_RETRACTION_ORDER = (
    (SphereExact, 2, "its retr is the exponential map of the increment's tangent part, which agrees with "
                     "the projection of x + u only to second order"),
    (geoopt.SphereExact, 1, "its retr is the exponential map of the whole increment, whose normal part "
                            "takes the state off the sphere"),
    (geoopt.EuclideanStiefelExact, 1, "its retr is the exponential map of the whole increment, whose normal "
                                      "part takes the state off the manifold"),
    (geoopt.StereographicExact, 1, "its retr is the exponential map, which departs from x + u at second "
                                   "order in the model's own chart"),
    (geoopt.Lorentz, 2, "its retr is the exponential map of the increment's tangent part, which agrees with "
                        "a projection of x + u only to second order"),
    (geoopt.SymmetricPositiveDefinite, 1, "its retr, x + u + u x^-1 u / 2, adds a second-order term to the "
                                          "increment"),
)


def _retraction_order(manifold) -> tuple[int, str, object] | None:
    """``(order, why, component)`` when ``manifold``'s retraction caps Runge-Kutta steps, else None."""
    if isinstance(manifold, geoopt.ProductManifold):
        caps = [c for c in map(_retraction_order, manifold.manifolds) if c is not None]
        return min(caps, key=lambda c: c[0], default=None)
    for cls, order, why in _RETRACTION_ORDER:
        if isinstance(manifold, cls):
            return order, why, manifold
    return None


def _check_retraction(method: str, order: int, manifold) -> None:
    cap = _retraction_order(manifold)
    if cap is None or order <= cap[0]:
        return
    limit, why, component = cap
    part = "" if component is manifold else f" (its component {_describe(component)})"
    allowed = [m for m, tab in _TABLEAUS.items() if tab.order <= limit]
    lie = " or rkmk2/rkmk4 (they move by the group action)" if isinstance(component, geoopt.Sphere) else ""
    raise ValueError(
        f"{method} (order {order}) is refused on {_describe(manifold)}{part}: a Runge-Kutta step ends with "
        f"retr(x, increment), and {why}, so the retraction caps every Runge-Kutta method at order {limit} here; "
        f"use {', '.join(allowed)}{lie}, or a manifold whose retr projects x + u (e.g. manifolds.Sphere, "
        f"manifolds.Stiefel)"
    )


def make_solver(method: str, manifold=None, mode: str = "strict", splitting: str | None = None):
    """The solver object for a method name (see ``METHODS``), split by ``splitting`` if given.

    Refuses, naming the manifold, the method and the reason, the combinations that would run but give
    a wrong answer: a Lie-group method without an SO(n) action on ``manifold`` (or with one whose
    derivatives are NaN, or that leaves the sphere's subspace), and a Runge-Kutta method whose order
    the manifold's retraction caps (the exponential maps of SphereExact, Lorentz and geoopt's Exact
    models, SPD's second-order retraction; see ``_RETRACTION_ORDER``).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if method in _TABLEAUS:
        _check_retraction(method, _TABLEAUS[method].order, manifold)
        solver = RungeKutta(_TABLEAUS[method], mode)
    else:
        solver = RKMK(_LIE[method], _action_for(method, manifold))
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
