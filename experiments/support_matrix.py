"""The support matrix: which method runs on which manifold, with which gradients, and how well.

Rows are manifolds (geoopt's and ours), columns the methods of ``solvers.METHODS``. Every cell is
either *supported*, which means all of

- (a) order: fixed-step methods converge at their order (least-squares slope of log error against
  log h over three step sizes, within 0.3), adaptive ones keep the error near the tolerance (below
  ``TOLERANCE_FACTOR * rtol`` at each rtol, falling as rtol falls), on a problem with an exact
  solution written with the manifold's own closed forms;
- (b) the state stays on the manifold over a long float32 solve (``LONG_STEPS`` fixed steps, or an
  adaptive solve over ``LONG_T``): ``|projx(y) - y| / max(1, |y|)`` below ``DRIFT_TOL``;
- (c) gradients: ``torch.autograd.gradcheck`` in float64 of the solve as a function of the field's
  parameters, by backprop and by checkpointing; the adjoint agrees with backprop up to the
  solver's error (their gap falls at the method's order, or is at rounding level);

or *refused* when the solve is set up, before the field is called, with an error naming the
manifold, the method and the reason (``solvers.make_solver``, ``manifolds.check_contract``, the
adjoint's own check). Solves are in strict mode, the default. The tests
(``tests/test_support_matrix.py``) run the same checks through the helpers here; this script runs
them all and writes the table.

The problems: with ``s(t) = cos t`` and ``S(t) = sin t`` (so every flow is bounded and comes back),

- ``x' = s(t) A x`` with ``A`` in the manifold's symmetry algebra (skew on spheres, so(1, n) on
  the hyperboloid, block-diagonal on the product), solved by ``expm(S(t) A) x0``;
- ``X' = s(t) (A X + X B)`` on Stiefel, SO(n) (``A``, ``B`` skew) and SPD (``B = A^T``), solved by
  ``expm(S A) X0 expm(S B)``;
- on the stereographic models (Poincaré ball, projected sphere) the Killing field of the
  gyro-translations ``x -> a ⊕ x`` along ``v``, ``(1 - k |x|^2) v + 2 k <v, x> x``, solved by
  ``expmap0(S(t) v) ⊕ x0`` with geoopt's own ``mobius_add`` and ``expmap0``.

The field's generator is ``theta . basis`` for three fixed basis elements, so ``theta`` (three
numbers) is what the gradient checks differentiate.

    python -m experiments.support_matrix [--out experiments/results]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import geoopt
import numpy as np
import torch

import manifolds
import solvers

NAME = "support_matrix"
F64, F32 = torch.float64, torch.float32
T = 1.0  # end time of the convergence and gradient problems
ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "bosh3": 3, "dopri5": 5, "rkmk2": 2, "rkmk4": 4}
METHODS = tuple(ORDER)  # the table's columns
ADAPTIVE = ("bosh3", "dopri5")
GRADIENTS = ("backprop", "checkpoint", "adjoint")
GRADIENT_LETTER = {"backprop": "b", "checkpoint": "c", "adjoint": "a"}
# Steps over [0, T] for the fitted order: errors well above float64 rounding, in the asymptotic range.
STEPS = {1: (16, 32, 64), 2: (8, 16, 32), 4: (8, 16, 32)}
ORDER_SLACK = 0.3  # |fitted order - method order| allowed
RTOLS = (1e-4, 1e-6, 1e-8)  # adaptive solves, atol = rtol
TOLERANCE_FACTOR = 30.0  # an adaptive solve's error may exceed rtol * max(1, |y|) by this much
LONG_STEPS = 1000  # fixed float32 steps of the drift check, over [0, LONG_T]
LONG_T = 10.0
LONG_RTOL = 1e-5  # adaptive float32 drift check
DRIFT_TOL = 1e-5  # |projx(y) - y| / max(1, |y|) in float32
GRAD_STEPS = 2  # fixed steps per output interval of the gradient checks
GRAD_RTOL = 1e-4  # adaptive gradient checks (gradcheck's own tolerances: steps chosen at another theta differ by ~rtol)
ADJOINT_STEPS = {1: (16, 32), 2: (8, 16), 4: (4, 8)}
ADJOINT_RTOLS = (1e-5, 1e-6)
ADJOINT_TINY = 1e-9  # a relative adjoint/backprop gap this small is rounding (linear fields)
THETA = (1.0, 0.6, -0.8)


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def s(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t)


def S(t: float) -> float:
    return math.sin(t)


def _skew(g, n: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=F64)
    return (a - a.T) / 2


def _general(g, n: int) -> torch.Tensor:
    return 0.7 * torch.randn(n, n, generator=g, dtype=F64)


def _lorentz_generator(g, n: int) -> torch.Tensor:
    """An element of so(1, n - 1): a boost part (symmetric in the time row and column) and a rotation."""
    k = torch.zeros(n, n, dtype=F64)
    b = 0.5 * torch.randn(n - 1, generator=g, dtype=F64)
    k[0, 1:], k[1:, 0], k[1:, 1:] = b, b, _skew(g, n - 1) / 2
    return k


def _block(*blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


def _mean_zero_skew(g, n: int) -> torch.Tensor:
    p = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    return p @ _skew(g, n) @ p


@dataclass
class Instance:
    """One problem made concrete in one dtype."""

    manifold: geoopt.Manifold
    y0: torch.Tensor
    theta: torch.Tensor
    make_field: Callable[[torch.Tensor], Callable]  # theta -> f(t, x)
    exact: Callable[[float], torch.Tensor]  # t -> y(t) at THETA


@dataclass(frozen=True)
class Problem:
    """A row of the matrix: a manifold, a start point and a field with a closed-form flow.

    ``kind`` is "linear" (``x' = s A x``), "two_sided" (``X' = s (A X + X B)``) or "mobius" (the
    gyro-translation field of a stereographic model); ``basis(g)`` returns the generator's basis
    (for "two_sided" a pair of bases), ``start(g)`` the start point, both in float64.
    """

    key: str
    label: str
    make: Callable[[], geoopt.Manifold]
    kind: str
    basis: Callable
    start: Callable
    note: str = ""

    def instance(self, dtype=F64) -> Instance:
        return _instance(self.key, dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _stiefel_start(n: int, p: int):
    return lambda g: torch.linalg.qr(torch.randn(n, p, generator=g, dtype=F64))[0]


def _so_start(n: int):
    def start(g):
        q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        if torch.linalg.det(q) < 0:
            q = q * torch.tensor([1.0] * (n - 1) + [-1.0], dtype=F64)
        return q

    return start


def _spd_start(g):
    b = torch.randn(3, 3, generator=g, dtype=F64)
    return b @ b.T / 3 + torch.eye(3, dtype=F64)


def _lorentz_start(g):
    u = torch.cat([torch.zeros(2, 1, dtype=F64), 0.4 * torch.randn(2, 3, generator=g, dtype=F64)], -1)
    return geoopt.Lorentz().to(F64).expmap0(u)


def _spd_basis(g):
    a = _three(lambda g: 0.5 * _general(g, 3))(g)
    return a, a.transpose(-1, -2)  # X' = A X + X A^T


def _three(make_one):
    return lambda g: torch.stack([make_one(g) for _ in range(3)])


PROBLEMS = {
    p.key: p
    for p in [
        Problem("euclidean", "geoopt.Euclidean", lambda: geoopt.Euclidean(ndim=1), "linear",
                _three(lambda g: _general(g, 3)), lambda g: torch.randn(2, 3, generator=g, dtype=F64)),
        Problem("sphere", "manifolds.Sphere", lambda: manifolds.Sphere(), "linear",
                _three(lambda g: _skew(g, 4)), lambda g: _unit(torch.randn(2, 4, generator=g, dtype=F64))),
        Problem("sphere_exact", "manifolds.SphereExact", lambda: manifolds.SphereExact(), "linear",
                _three(lambda g: _skew(g, 4)), lambda g: _unit(torch.randn(2, 4, generator=g, dtype=F64))),
        Problem("layernorm_sphere", "manifolds.LayerNormSphere", lambda: manifolds.LayerNormSphere(), "linear",
                _three(lambda g: _mean_zero_skew(g, 4)),
                lambda g: manifolds.LayerNormSphere().projx(torch.randn(2, 4, generator=g, dtype=F64))),
        Problem("geoopt_sphere", "geoopt.Sphere", lambda: geoopt.Sphere(), "linear",
                _three(lambda g: _skew(g, 4)), lambda g: _unit(torch.randn(2, 4, generator=g, dtype=F64))),
        Problem("geoopt_sphere_exact", "geoopt.SphereExact", lambda: geoopt.SphereExact(), "linear",
                _three(lambda g: _skew(g, 4)), lambda g: _unit(torch.randn(2, 4, generator=g, dtype=F64))),
        Problem("canonical_stiefel", "geoopt.Stiefel() (canonical)", lambda: geoopt.Stiefel(), "two_sided",
                lambda g: (_three(lambda g: _skew(g, 4))(g), _three(lambda g: _skew(g, 2))(g)), _stiefel_start(4, 2)),
        Problem("geoopt_euclidean_stiefel", "geoopt.EuclideanStiefel", lambda: geoopt.EuclideanStiefel(), "two_sided",
                lambda g: (_three(lambda g: _skew(g, 4))(g), _three(lambda g: _skew(g, 2))(g)), _stiefel_start(4, 2)),
        Problem("stiefel", "manifolds.Stiefel", lambda: manifolds.Stiefel(), "two_sided",
                lambda g: (_three(lambda g: _skew(g, 4))(g), _three(lambda g: _skew(g, 2))(g)), _stiefel_start(4, 2)),
        Problem("so3", "manifolds.SpecialOrthogonal (SO(3))", lambda: manifolds.SpecialOrthogonal(), "two_sided",
                lambda g: (_three(lambda g: _skew(g, 3))(g), _three(lambda g: _skew(g, 3))(g)), _so_start(3)),
        Problem("poincare", "geoopt.PoincareBall", lambda: geoopt.PoincareBall(), "mobius",
                lambda g: 0.3 * torch.randn(3, 3, generator=g, dtype=F64),
                lambda g: 0.3 * torch.randn(2, 3, generator=g, dtype=F64)),
        Problem("stereographic", "geoopt.Stereographic(k=1)", lambda: geoopt.Stereographic(k=1.0), "mobius",
                lambda g: 0.2 * torch.randn(3, 3, generator=g, dtype=F64),
                lambda g: 0.3 * torch.randn(2, 3, generator=g, dtype=F64)),
        Problem("lorentz", "geoopt.Lorentz", lambda: geoopt.Lorentz(), "linear",
                _three(lambda g: _lorentz_generator(g, 4)), _lorentz_start,
                note="geoopt.Lorentz().to(torch.float64) for float64 states: its curvature is a float32 "
                     "parameter, and its check_point_on_manifold crashes on float64 points otherwise"),
        Problem("spd", "geoopt.SymmetricPositiveDefinite", lambda: geoopt.SymmetricPositiveDefinite(), "two_sided",
                _spd_basis, _spd_start),
        Problem("product", "geoopt.ProductManifold(Sphere(3), Euclidean(2))",
                lambda: geoopt.ProductManifold((manifolds.Sphere(), 3), (geoopt.Euclidean(), 2)), "linear",
                _three(lambda g: _block(_skew(g, 3), _general(g, 2))),
                lambda g: torch.cat([_unit(torch.randn(2, 3, generator=g, dtype=F64)),
                                     torch.randn(2, 2, generator=g, dtype=F64)], -1)),
    ]
}


def _seed(key: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(key)) % 2**31


def _combine(theta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``sum_i theta_i basis_i``."""
    return torch.einsum("i,i...->...", theta, basis)


@cache
def _instance(key: str, dtype) -> Instance:
    """The problem's manifold, start, parameters and field in ``dtype``; its exact solution in float64."""
    problem = PROBLEMS[key]
    g = torch.Generator().manual_seed(_seed(key))
    manifold = problem.make().to(dtype)  # geoopt keeps curvatures as parameters: cast them with the states
    basis = problem.basis(g)  # float64; a pair of bases for "two_sided"
    y0 = problem.start(g)
    theta = torch.tensor(THETA, dtype=F64)
    cast = tuple(b.to(dtype) for b in basis) if isinstance(basis, tuple) else basis.to(dtype)
    # Every field builds its generator from theta at each call: the adjoint differentiates each call.
    if problem.kind == "linear":
        def make_field(th):
            return lambda t, x: s(t) * (x @ _combine(th, cast).transpose(-1, -2))

        def exact(t):
            return y0 @ torch.linalg.matrix_exp(S(t) * _combine(theta, basis)).T
    elif problem.kind == "two_sided":
        def make_field(th):
            return lambda t, x: s(t) * (_combine(th, cast[0]) @ x + x @ _combine(th, cast[1]))

        def exact(t):
            a, b = (torch.linalg.matrix_exp(S(t) * _combine(theta, part)) for part in basis)
            return a @ y0 @ b
    elif problem.kind == "mobius":
        # The curvature as this manifold computes it (PoincareBall keeps c through a softplus of a
        # float32 parameter: the float64 value is not exactly 1).
        k = float(manifold.k)

        def make_field(th):
            def f(t, x):
                v = th @ cast
                return s(t) * ((1 - k * (x * x).sum(-1, keepdim=True)) * v + 2 * k * (x @ v).unsqueeze(-1) * x)

            return f

        model = problem.make().to(F64)

        def exact(t):
            return model.mobius_add(model.expmap0(S(t) * (theta @ basis)).expand_as(y0), y0)
    else:
        raise ValueError(f"unknown problem kind {problem.kind!r}")
    return Instance(manifold, y0.to(dtype), theta.to(dtype), make_field, lambda t: exact(t).to(dtype))


# ----------------------------------------------------------------------------------------------
# Solves and checks
# ----------------------------------------------------------------------------------------------


class FieldCalled(Exception):
    """Raised by the sentinel field: the solve got past its set-up."""


def solve(inst: Instance, f, t, method: str, *, steps=None, rtol=None, gradient="backprop", adjoint_params=None,
          y0=None, unchecked=False):
    """``solvers.odeint`` by method name; ``unchecked``: the same solve through ``integrate`` with the
    method's Runge-Kutta tableau, past ``make_solver``'s refusals (to show what a refusal prevents)."""
    options = {"gradient": gradient}
    kwargs = {}
    if method in ADAPTIVE:
        kwargs = {"rtol": rtol, "atol": rtol}
    else:
        options["steps"] = steps
    y0 = inst.y0 if y0 is None else y0
    if unchecked:
        tableau = {"euler": solvers.EULER, "midpoint": solvers.MIDPOINT, "heun": solvers.HEUN, "rk4": solvers.RK4,
                   "bosh3": solvers.BOSH3, "dopri5": solvers.DOPRI5}[method]
        controller = solvers.make_controller(method, options=None if method in ADAPTIVE else {"steps": steps},
                                             **kwargs)
        return solvers.integrate(f, y0, t, solver=solvers.RungeKutta(tableau), manifold=inst.manifold,
                                 controller=controller, gradient=gradient).ys
    return solvers.odeint(f, y0, t, method=method, manifold=inst.manifold,
                          options=options, adjoint_params=adjoint_params, **kwargs)


def refusal(problem: Problem, method: str, gradient: str = "backprop") -> str | None:
    """The error the solve's set-up raises, or None when it gets as far as calling the field."""
    inst = problem.instance(F64)

    def sentinel(t, x):
        raise FieldCalled

    theta = inst.theta.clone().requires_grad_(True)
    try:
        solve(inst, sentinel, torch.tensor([0.0, T], dtype=F64), method, steps=2, rtol=1e-6, gradient=gradient,
              adjoint_params=(theta,) if gradient == "adjoint" else None)
    except FieldCalled:
        return None
    except Exception as error:  # noqa: BLE001 - any set-up error is the refusal being checked
        return f"{type(error).__name__}: {error}"
    return None


def fitted_order(steps, errors) -> float:
    """Least-squares slope of log(error) against log(h), ``h = T / steps``."""
    return float(np.polyfit(np.log(T / np.asarray(steps, dtype=float)), np.log(np.asarray(errors)), 1)[0])


@torch.no_grad()  # forward only
def convergence(problem: Problem, method: str, unchecked: bool = False) -> tuple[float, list[float]]:
    """Fixed steps: (fitted order, errors at ``STEPS``); adaptive: (slope of error against rtol,
    errors at ``RTOLS``). Float64, end-point max-norm error against the closed form."""
    inst = problem.instance(F64)
    f = inst.make_field(inst.theta)
    t = torch.tensor([0.0, T], dtype=F64)
    exact = inst.exact(T)
    if method in ADAPTIVE:
        errors = [(solve(inst, f, t, method, rtol=r, unchecked=unchecked)[-1] - exact).abs().max().item()
                  for r in RTOLS]
        slope = float(np.polyfit(np.log(RTOLS), np.log(np.maximum(errors, 1e-300)), 1)[0])
        return slope, errors
    steps = STEPS[ORDER[method]]
    errors = [(solve(inst, f, t, method, steps=n, unchecked=unchecked)[-1] - exact).abs().max().item()
              for n in steps]
    return fitted_order(steps, errors), errors


def convergence_ok(problem: Problem, method: str, value: float, errors: list[float]) -> bool:
    if method in ADAPTIVE:
        scale = max(1.0, problem.instance(F64).exact(T).abs().max().item())
        within = all(e <= TOLERANCE_FACTOR * r * scale for e, r in zip(errors, RTOLS))
        falling = all(b < a for a, b in zip(errors, errors[1:]))
        return within and falling
    return abs(value - ORDER[method]) <= ORDER_SLACK


@torch.no_grad()
def drift(problem: Problem, method: str, unchecked: bool = False) -> float:
    """Largest ``|projx(y) - y| / max(1, |y|)`` over a long float32 solve (11 output times)."""
    inst = problem.instance(F32)
    f = inst.make_field(inst.theta)
    t = torch.linspace(0.0, LONG_T, 11)
    ys = solve(inst, f, t, method, steps=LONG_STEPS // 10, rtol=LONG_RTOL, unchecked=unchecked)
    if not torch.isfinite(ys).all():
        return math.inf
    m = inst.manifold
    gap = (m.projx(ys) - ys).abs().amax() / ys.abs().amax().clamp_min(1.0)
    return gap.item()


def gradcheck(problem: Problem, method: str, gradient: str) -> str | None:
    """``torch.autograd.gradcheck`` of ``theta -> ys`` (float64); None if it passes, else why not."""
    inst = problem.instance(F64)
    t = torch.tensor([0.0, T / 2, T], dtype=F64)

    def fn(theta):
        return solve(inst, inst.make_field(theta), t, method, steps=GRAD_STEPS, rtol=GRAD_RTOL, gradient=gradient)[1:]

    theta = inst.theta.clone().requires_grad_(True)
    try:
        torch.autograd.gradcheck(fn, (theta,), fast_mode=True)
    except Exception as error:  # noqa: BLE001 - a failure of any kind is the finding
        text = " ".join(str(error).split())
        return f"{type(error).__name__}: {text[:200]}"
    return None


def _loss_gradients(inst: Instance, method: str, gradient: str, steps=None, rtol=None) -> torch.Tensor:
    """d/d(theta, delta) of ``sum(w * ys)`` with ``y0 + proju(y0, delta)`` the start (at ``delta = 0``).

    The derivative along tangent directions only: the adjoint differentiates the ambient extension
    of the tangent field, whose derivative off the manifold is not the solve's (and ``proju``'s
    transpose, not ``proju``, removes the normal part of a gradient: they differ on the hyperboloid).
    """
    t = torch.tensor([0.0, T / 2, T], dtype=F64)
    theta = inst.theta.clone().requires_grad_(True)
    delta = torch.zeros_like(inst.y0, requires_grad=True)
    y0 = inst.y0 + inst.manifold.proju(inst.y0, delta)
    ys = solve(inst, inst.make_field(theta), t, method, steps=steps, rtol=rtol, gradient=gradient,
               adjoint_params=(theta,) if gradient == "adjoint" else None, y0=y0)
    w = torch.linspace(-1.0, 1.0, ys.numel(), dtype=F64).reshape(ys.shape)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad((w * ys).sum(), (theta, delta))])


def adjoint_gaps(problem: Problem, method: str) -> list[float]:
    """Relative gaps between the adjoint's and backprop's gradients at two resolutions
    (``ADJOINT_STEPS`` or ``ADJOINT_RTOLS``)."""
    inst = problem.instance(F64)
    gaps = []
    for level in ADJOINT_RTOLS if method in ADAPTIVE else ADJOINT_STEPS[ORDER[method]]:
        kw = {"rtol": level} if method in ADAPTIVE else {"steps": level}
        a = _loss_gradients(inst, method, "adjoint", **kw)
        try:
            b = _loss_gradients(inst, method, "backprop", **kw)
        except ValueError:  # backprop refused on this manifold (a geoopt defect): checkpoint's gradients
            b = _loss_gradients(inst, method, "checkpoint", **kw)  # are backprop's, recomputed
        gaps.append(((a - b).abs().max() / b.abs().max()).item())
    return gaps


def adjoint_ok(method: str, gaps: list[float]) -> bool:
    if gaps[-1] <= ADJOINT_TINY:
        return True
    if method in ADAPTIVE:  # within the solver's error: a small multiple of rtol at each rtol
        return all(g <= TOLERANCE_FACTOR * r for g, r in zip(gaps, ADJOINT_RTOLS))
    order = math.log2(gaps[0] / gaps[1]) if gaps[1] > 0 else math.inf
    return order >= ORDER[method] - 0.5


def gradient_result(problem: Problem, method: str, gradient: str) -> tuple[str, str]:
    """``("ok" | "refused" | "fail", detail)`` for one gradient mode of one cell."""
    if gradient == "adjoint":
        refused = refusal(problem, method, "adjoint")
        if refused is not None:
            return "refused", refused
        try:
            gaps = adjoint_gaps(problem, method)
        except Exception as error:  # noqa: BLE001
            return "fail", f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        return ("ok" if adjoint_ok(method, gaps) else "fail"), "gaps " + ", ".join(f"{g:.2g}" for g in gaps)
    why = gradcheck(problem, method, gradient)
    if why is not None and why.startswith("ValueError: gradient=") and "geoopt" in why:
        return "refused", why  # a geoopt defect, named when the backward pass starts
    return ("ok", "") if why is None else ("fail", why)


# ----------------------------------------------------------------------------------------------
# Cells and the table
# ----------------------------------------------------------------------------------------------


@dataclass
class Cell:
    problem: str
    method: str
    refused: str | None = None
    value: float | None = None  # fitted order, or for adaptive methods the slope of error against rtol
    errors: list = field(default_factory=list)
    converges: bool = False
    drift: float | None = None
    gradients: dict = field(default_factory=dict)  # mode -> (status, detail)

    @property
    def supported(self) -> bool:
        return (self.refused is None and self.converges and self.drift is not None and self.drift <= DRIFT_TOL
                and all(status != "fail" for status, _ in self.gradients.values()))

    def text(self) -> str:
        if self.refused is not None:
            return f"refused: {short_reason(self.refused)}"
        mark = "✓" if self.supported else "✗"
        value = f"{self.value:.1f}" if self.method not in ADAPTIVE else f"tol^{self.value:.1f}"
        letters = " ".join(GRADIENT_LETTER[g] for g in GRADIENTS if self.gradients.get(g, ("",))[0] == "ok")
        problems = []
        if not self.converges:
            problems.append("order" if self.method not in ADAPTIVE else "tolerance")
        if self.drift is None or self.drift > DRIFT_TOL:
            problems.append(f"drift {self.drift:.0e}")
        problems += [f"{GRADIENT_LETTER[g]} fails" for g in GRADIENTS if self.gradients.get(g, ("",))[0] == "fail"]
        problems += [f"{GRADIENT_LETTER[g]} refused" for g in GRADIENTS
                     if self.gradients.get(g, ("",))[0] == "refused"]
        tail = f" ({'; '.join(problems)})" if problems else ""
        return f"{mark} {value} / {letters or '–'}{tail}"


_REASONS = [  # (pattern in the message, short reason for the table)
    (r"breaks the solver contract: proju is not idempotent", "proju not a projection (contract)"),
    (r"Lie-group methods need a manifold with an SO\(n\) action", "no SO(n) action"),
    (r"projx is an SVD whose backward is NaN", "SVD projx: NaN gradient"),
    (r"mean-zero plane", "action leaves the mean-zero plane"),
    (r"caps every Runge-Kutta method at order (\d)", "retr caps the order at {0}"),
]


def short_reason(message: str) -> str:
    for pattern, text in _REASONS:
        match = re.search(pattern, message)
        if match:
            return text.format(*match.groups())
    return " ".join(message.split())[:60]


def run_cell(problem: Problem, method: str, gradients=GRADIENTS) -> Cell:
    cell = Cell(problem.key, method)
    with torch.no_grad():  # the solve itself; a gradient mode's own refusal is its column's
        cell.refused = refusal(problem, method)
    if cell.refused is not None:
        return cell
    cell.value, cell.errors = convergence(problem, method)
    cell.converges = convergence_ok(problem, method, cell.value, cell.errors)
    cell.drift = drift(problem, method)
    for gradient in gradients:
        cell.gradients[gradient] = gradient_result(problem, method, gradient)
    return cell


def build(problems=None, methods=METHODS, progress=None) -> dict:
    cells = {}
    for key in problems or PROBLEMS:
        for method in methods:
            start = time.perf_counter()
            cells[key, method] = run_cell(PROBLEMS[key], method)
            if progress:
                progress(cells[key, method], time.perf_counter() - start)
    return cells


# Why a gradient mode fails where it does: (pattern in the error, the cause and where its fix belongs).
DEFECT_CAUSES = [
    ("TorchScript interpreter",
     "torch.utils.checkpoint (non-reentrant) cannot recompute geoopt's TorchScript maps (the stereographic "
     "projx, the Lorentz expmap): the recomputation fails inside the TorchScript interpreter (and with early "
     "stop off, recomputes tensors of other shapes). Fixed-step solves end each checkpointed step inside one; "
     "adaptive steps do not, and pass. Belongs to solvers/checkpointing.py (or run with PYTORCH_JIT=0)."),
    ("modified by an inplace operation",
     "geoopt.EuclideanStiefel.retr fixes the signs of its QR factor in place, which autograd refuses in the "
     "backward pass (checkpointing recomputes the step and gets through). manifolds.Stiefel is the same "
     "manifold with an out-of-place retr. Belongs to manifolds/ (a contract check of retr's backward) or to "
     "the solve's set-up."),
]


def _cause(detail: str) -> str:
    for pattern, cause in DEFECT_CAUSES:
        if pattern in detail:
            return cause
    return detail


def markdown(cells: dict, seconds: float, rows=None, methods=None) -> str:
    keys = rows or list(dict.fromkeys(k for k, _ in cells))
    methods = methods or list(dict.fromkeys(m for _, m in cells))
    lines = [
        "# Support matrix: methods x manifolds x gradients",
        "",
        f"`python -m experiments.support_matrix` ({seconds:.0f} s on one thread), torch {torch.__version__}, "
        f"geoopt {geoopt.__version__}; strict mode (the default). The same checks run in "
        "`tests/test_support_matrix.py`, which also shows that each `retr caps the order` refusal prevents a "
        "wrong answer.",
        "",
        "| manifold | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for key in keys:
        row = [cells[key, m].text() for m in methods]
        lines.append(f"| {PROBLEMS[key].label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Legend",
        "",
        f"- `✓ p / b c a`: supported. `p` is the fitted order of a fixed-step method (slope of log error "
        f"against log h over {len(STEPS[1])} step sizes, float64; passes within {ORDER_SLACK} of the "
        f"method's order), or for an adaptive method `tol^p`, the slope of log error against log rtol over "
        f"rtol = {', '.join(f'{r:g}' for r in RTOLS)} (passes when every error is below "
        f"{TOLERANCE_FACTOR:g} rtol max(1, |y|) and falls with rtol). Every supported cell also stays on "
        f"the manifold over a long float32 solve ({LONG_STEPS} fixed steps over [0, {LONG_T:g}], or an "
        f"adaptive solve at rtol {LONG_RTOL:g} over the same span): |projx(y) - y| / max(1, |y|) <= "
        f"{DRIFT_TOL:g}.",
        "- Gradient letters, for the modes that pass: `b` backprop and `c` checkpoint pass "
        "`torch.autograd.gradcheck` (float64, the solve as a function of the field's three parameters, "
        f"{GRAD_STEPS} steps per output interval or rtol {GRAD_RTOL:g}); `a` the adjoint agrees with "
        "backprop up to the solver's error (fixed steps: the relative gap falls at the method's order "
        f"within 0.5 between two step counts, or is below {ADJOINT_TINY:g}; adaptive: below "
        f"{TOLERANCE_FACTOR:g} rtol at rtol {ADJOINT_RTOLS[0]:g} and {ADJOINT_RTOLS[1]:g}). `(a refused)`: "
        "the adjoint is refused at set-up for Lie-group methods (`gradient='checkpoint'` instead).",
        "- `✗ p / ... (x fails)`: runs, converges and stays on the manifold, but gradient mode `x` fails "
        "(see Defects).",
        "- `(x refused)`: gradient mode `x` is refused with a one-line error naming the reason: the adjoint for "
        "Lie-group methods (at set-up), and two geoopt 0.5.1 defects, raised when the backward pass starts "
        "(`solvers.compat.upstream_defect`): checkpointing fixed steps on geoopt's TorchScript manifolds "
        "(Stereographic family, Lorentz), and backprop through `geoopt.EuclideanStiefel.retr`'s in-place sign fix "
        "(use `manifolds.Stiefel`).",
        "- `refused: reason`: the solve is refused when it is set up, before the field is called, with an "
        "error naming the manifold, the method and the reason:",
        "  - *no SO(n) action*: rkmk2/rkmk4 need a group action (spheres, Stiefel, SO(n));",
        "  - *proju not a projection (contract)*: geoopt's canonical Stiefel (its `proju` is the canonical "
        "metric's gradient conversion), refused by `manifolds.check_contract` for every Runge–Kutta method: "
        "use `manifolds.Stiefel`;",
        "  - *SVD projx: NaN gradient*: an RKMK step ends with the manifold's `projx`, an SVD on geoopt's "
        "Stiefel manifolds, whose backward is NaN at orthonormal matrices: use `manifolds.Stiefel`;",
        "  - *retr caps the order at q*: a Runge–Kutta step ends with `retr(x, h sum b_i k_i)`, which keeps "
        "the tableau's order only when `retr` maps `x + u` onto the manifold and fixes the manifold's points. "
        "The exponential map (SphereExact, Lorentz, and geoopt's Exact stereographic models and "
        "EuclideanStiefelExact) and SPD's `x + u + u x^-1 u / 2` do not: every tableau is order q there "
        "(and on geoopt's SphereExact the increment's normal part takes the state off the sphere), so "
        "methods of higher order are refused;",
        "  - *action leaves the mean-zero plane*: the sphere action's generator does not remove the field's "
        "mean, so rkmk on `LayerNormSphere` converges to another ODE (first order for a field with a mean).",
        "- Problems (float64 for (a) and (c), float32 for (b)): `x' = cos(t) A x` with `A` in the manifold's "
        "symmetry algebra (solution `expm(sin(t) A) x0`: rotations on the spheres, a boost and a rotation on "
        "the hyperboloid, block-diagonal on the product), `X' = cos(t) (A X + X B)` on Stiefel, SO(3) and SPD "
        "(`expm(sin(t) A) X0 expm(sin(t) B)`, `B = A^T` on SPD), and on the stereographic models the Killing "
        "field of the gyro-translations, `(1 - k|x|^2) v + 2k<v, x> x` (`expmap0(sin(t) v) ⊕ x0` with "
        "geoopt's own maps).",
    ]
    notes = [f"- {PROBLEMS[k].label}: {PROBLEMS[k].note}" for k in keys if PROBLEMS[k].note]
    if notes:
        lines += ["", "## Notes", "", *notes]
    failures = {}  # (mode or check, cause) -> cells
    for key in keys:
        for method in methods:
            cell = cells[key, method]
            if cell.refused is not None or cell.supported:
                continue
            for gradient, (status, detail) in cell.gradients.items():
                if status == "fail":
                    failures.setdefault((gradient, _cause(detail)), []).append(f"{PROBLEMS[key].label} x {method}")
            if not cell.converges:
                errors = ", ".join(f"{e:.2g}" for e in cell.errors)
                failures.setdefault(("order", f"errors {errors}"), []).append(f"{PROBLEMS[key].label} x {method}")
            if cell.drift is None or cell.drift > DRIFT_TOL:
                failures.setdefault(("drift", f"{cell.drift:.2g}"), []).append(f"{PROBLEMS[key].label} x {method}")
    if failures:
        lines += ["", "## Defects", ""]
        lines += [f"- {what} fails on {', '.join(where)}: {cause}" for (what, cause), where in failures.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results", help="folder for support_matrix.md")
    parser.add_argument("--rows", nargs="*", default=None, choices=list(PROBLEMS), help="a subset of rows")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()

    def progress(cell, seconds):
        print(f"{cell.problem:26s} {cell.method:8s} {seconds:6.2f}s  {cell.text()}", flush=True)

    cells = build(args.rows, args.methods, progress)
    text = markdown(cells, time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
