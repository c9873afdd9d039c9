"""A continuous normalising flow on a manifold: a base distribution pushed along a field.

Along ``x' = F(t, x)`` (``F`` the field's tangent projection) the log-density changes at the rate
``-div F``: ``log p_T(x(T)) = log p_0(x(0)) - int_0^T div F(x(t)) dt``. Each method solves the state
and the log-density change together, as one tuple state ``(x, L)`` on ``manifold x R``.
"""

from __future__ import annotations

import math
from itertools import chain

import geoopt
import torch
from torch import nn

from .divergence import divergence
from .interface import odeint

__all__ = ["CNF"]


class CNF(nn.Module):
    """``log_prob``, ``sample`` and ``sample_and_log_prob`` of a flow on a manifold.

    Args:
        field: the field ``field(t, x)`` (an ``nn.Module``: its parameters train).
        manifold: where the points live (see ``solvers.divergence`` for the supported ones).
        base: the distribution at ``t = 0``, with ``log_prob`` and ``sample`` (``manifolds.distributions``);
            one that names its ``manifold`` must name the flow's (same kind, same radius or curvature).
        horizon: the time ``T`` the flow runs for.
        method, options: the solver, as ``solvers.odeint`` takes them (default rk4 with 20 steps;
            ``options["gradient"]`` picks backprop, checkpoint or the adjoint).
        divergence_method: "exact" or "hutchinson" (see ``solvers.divergence``).
    """

    def __init__(self, field: nn.Module, manifold, base, *, horizon: float = 1.0, method: str = "rk4",
                 options: dict | None = None, divergence_method: str = "exact"):
        super().__init__()
        _check_base(base, manifold)
        self.field, self.manifold, self.base, self.horizon = field, manifold, base, float(horizon)
        self.method = method
        self.options = {"steps": 20} if options is None and method not in ("bosh3", "dopri5") else dict(options or {})
        self.divergence_method = divergence_method

    def _solve(self, x: torch.Tensor, t0: float, t1: float, sign: float):
        """``(x(t1), L(t1))`` from ``(x, 0)`` at ``t0``, with ``L' = sign * div F``."""
        def augmented(t, y):
            point = y[0]
            rate = divergence(self.field, t, point, self.manifold, method=self.divergence_method)
            return self.manifold.proju(point, self.field(t, point)), sign * rate[..., None]

        zero = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        t = torch.tensor([t0, t1], dtype=x.dtype)
        # The augmented field is a closure: under the adjoint, name the parameters it differentiates.
        params = tuple(self.field.parameters()) if self.options.get("gradient") == "adjoint" else None
        xs, ls = odeint(augmented, (x, zero), t, method=self.method, manifold=(self.manifold, None),
                        options=self.options, adjoint_params=params)
        return xs[-1], ls[-1, ..., 0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_T(x)``: the flow run back to the base, plus the base's log-density there."""
        tol = 1e-5 if x.dtype == torch.float64 else 1e-3
        ok, reason = self.manifold.check_point_on_manifold(x.detach(), explain=True, atol=tol, rtol=tol)
        if not ok:
            raise ValueError(f"log_prob was asked at points off {self.manifold!r}: {reason}")
        z, change = self._solve(x, self.horizon, 0.0, 1.0)  # L(0) = -int_0^T div F dt
        return self.base.log_prob(z) + change

    def sample(self, n: int, *, generator=None, dtype=None) -> torch.Tensor:
        """``n`` points of the flow at ``T``, in ``dtype`` (default: the field's, see ``_dtype``)."""
        z = self.base.sample(n, dtype=self._dtype(dtype), generator=generator)
        return odeint(self.field, z, torch.tensor([0.0, self.horizon], dtype=z.dtype), method=self.method,
                      manifold=self.manifold, options=self.options)[-1]

    def sample_and_log_prob(self, n: int, *, generator=None, dtype=None):
        """``n`` points of the flow at ``T`` and their log-densities, as ``sample``."""
        z = self.base.sample(n, dtype=self._dtype(dtype), generator=generator)
        x, change = self._solve(z, 0.0, self.horizon, -1.0)
        return x, self.base.log_prob(z) + change

    def _dtype(self, dtype):
        """``dtype``, else the one dtype of the field's floating-point parameters and buffers (a
        float32 module samples in float32), else float64 (a function, a field without tensors or
        with several dtypes)."""
        if dtype is not None:
            return dtype
        tensors = chain(self.field.parameters(), self.field.buffers()) if isinstance(self.field, nn.Module) else ()
        floats = {t.dtype for t in tensors if t.is_floating_point()}
        return floats.pop() if len(floats) == 1 else torch.float64


def _same_manifold(a, b) -> bool:
    """Whether ``a`` and ``b`` are one manifold for densities: kind, radius or curvature, and for
    products the factors with their point shapes, in order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, geoopt.ProductManifold):
        return list(a.shapes) == list(b.shapes) and all(map(_same_manifold, a.manifolds, b.manifolds))
    if isinstance(a, geoopt.Euclidean):  # Euclidean's ndim is a batching convention only
        return True
    # The radius (extra_repr) or curvature (k) sets the volume a density is normalised over.
    return a.extra_repr() == b.extra_repr() and (
        not isinstance(a, geoopt.Stereographic) or math.isclose(a.k.item(), b.k.item(), rel_tol=1e-6))


def _check_base(base, manifold) -> None:
    """``ValueError`` if ``base`` says it lives on a manifold other than ``manifold``."""
    own = getattr(base, "manifold", None)
    if own is not None and not _same_manifold(own, manifold):
        raise ValueError(f"the base distribution {type(base).__name__} lives on {_describe(own)}, not on the flow's "
                         f"{_describe(manifold)}")


def _describe(manifold) -> str:
    """The manifold's repr with the curvature of it or of its factors, which geoopt's repr leaves out
    (``-`` for a factor without one)."""
    factors = list(manifold.manifolds) if isinstance(manifold, geoopt.ProductManifold) else [manifold]
    ks = [repr(m.k.item()) if isinstance(getattr(m, "k", None), torch.Tensor) else "-" for m in factors]
    if set(ks) == {"-"}:
        return repr(manifold)
    return f"{manifold!r} ({'curvature' if len(ks) == 1 else 'curvatures'} {', '.join(ks)})"
