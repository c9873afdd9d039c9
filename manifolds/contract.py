"""``check_contract``: a set-up check that a manifold does what the solvers assume of it.

The solvers call only ``projx``, ``proju`` and ``retr``. A manifold that gets one of them wrong
still gives a solve without an error, but of another ODE or off the manifold. One example is
geoopt's canonical ``Stiefel``, whose ``proju`` is not a projection, so strict mode integrates
another field. ``check_contract`` runs each map once on a couple of the solve's points: about ten
tensor operations. It raises ``ManifoldContractError`` with one line that says what failed, by
how much, and what to do.
"""

from __future__ import annotations

import math
import warnings

import geoopt
import torch

__all__ = ["ManifoldContractError", "check_contract"]

_POINTS = 2  # points of the batch checked: enough to catch a wrong map, cheap at any batch size
_NOISE = 1e-2  # relative size of the ambient perturbation projx must undo
_STEP = 1e-1  # norm of the tangent step retr takes
# float64 is held to 1e-5, as solvers.check_on_manifold holds y0: a normalisation sphere with eps > 0
# puts projx's points eps / 2 inside its radius (RMSNorm's formula; SVFlowLM's default eps is 1e-5),
# and its proju is idempotent only to that. A broken map is off by far more (geoopt's canonical
# Stiefel: 0.3 to 0.8).
_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}  # others (16-bit): 1e-2
# Not 0 (nor another common seed): states drawn from a stream seeded alike would give draws
# parallel to the points, and a tangent part too small to check anything.
_SEED = 2_718_281_829


class ManifoldContractError(ValueError):
    """A manifold's ``projx``, ``proju`` or ``retr`` breaks what the solvers assume."""


def _name(manifold) -> str:
    return " ".join(repr(manifold).split())  # a module's repr can span lines; the message must not


def _fix(manifold, what: str) -> str:
    if what == "proju" and isinstance(manifold, geoopt.CanonicalStiefel):
        return "use manifolds.Stiefel, whose proju is idempotent (or geoopt.EuclideanStiefel)"
    return {
        "projx": "make projx return points its check_point_on_manifold accepts",
        "proju": "make proju the projection onto the tangent space, or solve in relaxed mode (strict=False)",
        "retr": "make retr land on the manifold, e.g. retr(x, u) = projx(x + u)",
    }[what]


def _fail(manifold, what: str, problem: str) -> ManifoldContractError:
    return ManifoldContractError(
        f"{_name(manifold)} breaks the solver contract: {problem}; {_fix(manifold, what)}"
    )


def _check(manifold, check: str, *args, tol: float) -> tuple[bool, str | None]:
    """The manifold's own ``check``, or a pass with a warning when that check itself crashes.

    geoopt 0.5.1's ``Lorentz.check_vector_on_tangent`` compares with a float32 zero and raises on
    float64 input: a bug of the check, not of the manifold, and no reason to refuse the solve.
    """
    try:
        return getattr(manifold, check)(*args, explain=True, atol=tol, rtol=tol)
    except RuntimeError as error:
        message = f"{_name(manifold)}.{check} crashed ({error}); check_contract skipped it"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return True, None


def check_contract(manifold: geoopt.Manifold, x: torch.Tensor, *, strict: bool = True) -> None:
    """Check ``manifold``'s maps on the first points of ``x``, or raise ``ManifoldContractError``.

    Checks, to 1e-5 in float64, 1e-4 in float32 and 1e-2 in 16-bit:

    - ``projx(x + noise)`` is on the manifold (``check_point_on_manifold``);
    - strict mode only: ``proju(x, u)`` is tangent (``check_vector_on_tangent``) and idempotent,
      ``|proju(x, proju(x, u)) - proju(x, u)| <= tol max|proju(x, u)|``, for an ambient ``u``;
    - ``retr(x, v)`` is on the manifold for a tangent ``v`` of norm 0.1 per point.

    Args:
        manifold: the geoopt manifold of the solve.
        x: states on the manifold ``(..., *point_shape)``, e.g. ``y0``; only two are checked.
        strict: whether the solve projects the field with ``proju``.

    The random draws use a private generator: the global random stream is left as it was. A
    check of the manifold's own that crashes is skipped with a ``RuntimeWarning`` (see ``_check``).
    """
    ndim = getattr(manifold, "ndim", 0)
    event = x.shape[x.dim() - ndim:]
    x = x.detach().reshape(-1, *event)[:_POINTS]
    tol = _TOLERANCE.get(x.dtype, 1e-2)
    gen = torch.Generator(device=x.device).manual_seed(_SEED)

    def draw() -> torch.Tensor:
        # Entries of size 1 / sqrt(#entries of a point): ambient vectors of norm about 1 per point.
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        return noise / math.sqrt(max(event.numel(), 1))

    tiny = torch.finfo(x.dtype).tiny  # keeps a zero tangent vector from giving 0 / 0
    with torch.no_grad():
        scale = x.pow(2).mean().sqrt()
        ok, reason = _check(manifold, "check_point_on_manifold", manifold.projx(x + _NOISE * scale * draw()), tol=tol)
        if not ok:
            raise _fail(manifold, "projx", f"projx(x + noise) is off the manifold ({reason})")

        v = manifold.proju(x, draw())
        if strict:
            ok, reason = _check(manifold, "check_vector_on_tangent", x, v, tol=tol)
            if not ok:
                raise _fail(manifold, "proju", f"proju(x, u) is not tangent at x ({reason})")
            gap = ((manifold.proju(x, v) - v).abs().max() / v.abs().max().clamp_min(tiny)).item()
            if not gap <= tol:
                raise _fail(
                    manifold, "proju",
                    f"proju is not idempotent: proju(x, proju(x, u)) moves proju(x, u) by {gap:.3g} "
                    f"of its size (tolerance {tol:g}), so strict mode would integrate another field",
                )

        norms = v.reshape(len(v), -1).norm(dim=-1).clamp_min(tiny).reshape(-1, *(1,) * ndim)
        ok, reason = _check(manifold, "check_point_on_manifold", manifold.retr(x, _STEP * v / norms), tol=tol)
        if not ok:
            problem = f"retr(x, v) for a tangent v of norm {_STEP:g} is off the manifold ({reason})"
            raise _fail(manifold, "retr", problem)
