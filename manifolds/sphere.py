"""Spheres of any radius on geoopt's API, including the two a normalisation layer projects onto.

``Sphere(radius)`` extends ``geoopt.Sphere`` to radius ``r`` by scaling; the retraction stays
``projx(x + u)`` and ``expmap`` is the exact great-circle map. ``Sphere()`` is the unit sphere, as
``geoopt.Sphere()`` is.

``RMSSphere()`` (the same as ``Sphere(radius=None)``) has radius ``sqrt(d)`` for the last dimension
``d`` of the point: the sphere that RMSNorm projects onto. ``LayerNormSphere`` intersects that
sphere with the mean-zero hyperplane: the set LayerNorm (without its affine part) projects onto.

``eps`` reproduces the epsilon of a normalisation layer: ``projx(x) = x / sqrt(|x|^2 / r^2 + eps)``
(RMSNorm's formula). With ``eps > 0`` the projection lands at radius ``r * sqrt(1 - eps r^2/|x|^2)``,
slightly inside the sphere; keep ``eps = 0`` unless you must match a pretrained network.

Scale: a sum of squares overflows float32 above |x| ~ 1e19 and underflows below ~1e-19, and the
backward pass's ``|x|^-3`` sooner. ``projx`` therefore divides a point whose largest entry lies
outside ``[2^-31, 2^32]`` (float32; ``[2^-255, 2^256]`` in float64) by a factor that brings it
inside, so huge and tiny points land on the sphere (with derivatives to match) instead of
collapsing to 0 or inf. With ``eps > 0`` only huge points are rescaled: for tiny ones ``eps``
dominates and the layer's ``x / sqrt(eps)`` is already right. Ordinary points are not touched: in
eager mode ``projx`` runs the fused kernel (``F.rms_norm``, ``F.layer_norm``: their results bit for
bit) and reads back one flag, whether every point's ``1/rms`` (its own by-product) is in range; only
if one is not does it redo the batch rescaled. Under ``torch.compile`` it always takes the
rescaled path, which has no branch on the data (and divides ordinary points by exactly 1).

Points with no direction: with ``eps = 0`` (the exact projection) a zero vector, or for
``LayerNormSphere`` a constant one, has no nearest point on the sphere, and ``projx`` raises
``ValueError`` naming how many there were (in eager mode; under ``torch.compile`` the check is
skipped, as data-dependent checks would break the graph, and such points come out NaN). With
``eps > 0`` they map to 0 (then to the bias, through an ``AffineChart``): what RMSNorm and
LayerNorm do with them. ``LayerNormSphere`` needs ``d >= 2``: in one dimension the mean-zero
sphere has no points. NaN and inf are passed on as NaN, not raised: the solvers' ``check_finite``
and the training ``FiniteGuard`` report where they began.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F

__all__ = ["LayerNormSphere", "RMSSphere", "Sphere", "SphereExact"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _float32(x: torch.Tensor) -> torch.Tensor:
    # A norm summed in 16 bits loses the radius: normalise in float32, return in x's dtype.
    return x.float() if x.dtype in _LOW_PRECISION else x


def _safe_range(dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)``: points whose size (largest entry, or root mean square) lies in it normalise safely.

    The fourth roots of the smallest normal and the largest number, as powers of two: float32
    ``[2^-31, 2^32]``, float64 ``[2^-255, 2^256]``. The sum of squares (``<= d m^2``) and the
    ``|x|^-3`` of the backward pass stay normal numbers for ``d`` up to 2^20, and every entry within
    the precision of the largest (the only ones that count in the sum) squares to a normal number.
    """
    info = torch.finfo(dtype)
    return 2.0 ** math.ceil(math.log2(info.tiny) / 4), 2.0 ** (math.frexp(info.max)[1] // 4)


_SAFE_RANGE = {dtype: _safe_range(dtype) for dtype in (torch.float32, torch.float64)}


def _bounds(x: torch.Tensor) -> tuple[float, float]:
    return _SAFE_RANGE.get(x.dtype) or _safe_range(x.dtype)


def _all_within(stat: torch.Tensor, lo: float | None, hi: float | None) -> bool:
    """Whether every entry of ``stat`` lies in ``[lo, hi]`` (NaN does not): one reduction and read-back.

    ``None`` for a side the caller knows holds (it then costs one small kernel fewer). Eager only.
    """
    if lo is None:
        return stat.amax().item() <= hi
    if hi is None:
        return stat.amin().item() >= lo
    low, high = torch.aminmax(stat)
    return lo <= low.item() and high.item() <= hi


def _rescale(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / q, q)``: each point divided by ``q > 0`` so that its squares neither overflow nor underflow.

    ``q`` is ``(..., 1)``, from the largest ``|entry|`` ``m`` of each point, and detached (the
    normalisations are scale-invariant, so ``q`` has no gradient to pass on: the derivative at ``x``
    is that at ``x / q`` over ``q``, which the backward pass computes). Points with ``m`` in the safe
    range get ``q = 1`` exactly (``m / m``, or ``1`` from the clamp): their bits do not change.
    Points above it are scaled down to ``m = hi``, where ``eps`` is far below the mean square
    (``>= 2^64 / d`` in float32) and drops out as it does for the original point. With ``eps = 0``
    points below the range are scaled up to ``m = lo`` too, and a zero point (only it) gets ``q = 0``
    and comes out NaN (eager callers raise first); with ``eps > 0`` tiny points keep ``q = 1`` (eps
    dominates their norm) and a zero point maps to 0. No branch on the data: this is the path
    compiled graphs take. It costs a max-abs reduction and a division of ``x`` (and one more in
    the backward pass), which eager mode spends only on batches that need it.
    """
    lo, hi = _bounds(x)
    m = x.detach().abs().amax(-1, keepdim=True)
    # In place on m, a temporary: the fewer small operations, the less eager mode pays per call.
    q = m.div_(m.clamp(lo, hi)) if eps == 0 else m.div_(hi).clamp_(min=1.0)  # hi = 2^k: m / hi is exact
    return x / q, q


def _refuse(bad: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message.format(n=..., total=...))`` if any entry of ``bad`` is True (eager only)."""
    if bool(bad.any()):
        raise ValueError(message.format(n=int(bad.sum()), total=bad.numel()))


_FUSED_RMS_NORM = getattr(torch, "_fused_rms_norm", None)  # torch >= 2.8: F.rms_norm's kernel, with 1/rms


def _rms_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.rms_norm(x, eps), 1 / sqrt(mean(x^2) + eps))``: one kernel where torch exposes it."""
    global _FUSED_RMS_NORM
    if _FUSED_RMS_NORM is not None:
        try:
            return _FUSED_RMS_NORM(x, [x.shape[-1]], None, eps)
        except (NotImplementedError, RuntimeError):  # a private op: a backend may lack it
            _FUSED_RMS_NORM = None
    return F.rms_norm(x, x.shape[-1:], eps=eps), x.detach().pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()


class Sphere(geoopt.Sphere):
    """The sphere ``{x : |x| = r}``: the unit sphere by default, ``r = sqrt(d)`` when ``radius`` is None.

    Args:
        radius: the radius (default 1, geoopt's unit sphere), or None for ``sqrt(d)`` (the RMSNorm
            sphere, also spelt ``RMSSphere()``).
        eps: normalisation-layer epsilon inside ``projx`` (0 gives the exact projection).
    """

    name = "Sphere"

    def __init__(self, radius: float | None = 1.0, eps: float = 0.0):
        super().__init__()
        if radius is not None and not (math.isfinite(radius) and radius > 0):
            raise ValueError(
                f"Sphere radius must be positive and finite, got {radius}: pass the radius, or None "
                f"for sqrt(d) (the RMSNorm sphere)"
            )
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(
                f"eps must be non-negative and finite, got {eps}: 0 for the exact projection, or the "
                f"epsilon of the normalisation layer to match (e.g. 1e-5)"
            )
        self.radius = radius
        self.eps = eps

    def r(self, x: torch.Tensor) -> float:
        """The radius for points shaped like ``x``."""
        return math.sqrt(x.shape[-1]) if self.radius is None else self.radius

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        y = self._project_on_subspace(_float32(x))
        if not torch.compiler.is_compiling():
            # Eager: the plain formula, kept if every point's size was in range (one read-back).
            lo, hi = _bounds(y)
            if self.radius is None:
                out, rstd = _rms_norm(y, self.eps)  # fused, and RMSNorm to the bit
                if _all_within(rstd, 1 / hi, None if self.eps >= lo * lo else 1 / lo):  # rstd <= eps^-1/2
                    return out.to(x.dtype)
            else:
                floor = self.eps * self.radius * self.radius
                denominator = y.pow(2).sum(-1, keepdim=True) + floor
                if _all_within(denominator, None if floor >= lo * lo else lo * lo, hi * hi):
                    return (y * (self.radius * torch.rsqrt(denominator))).to(x.dtype)
        return self._projx_rescaled(y).to(x.dtype)

    def _projx_rescaled(self, x: torch.Tensor) -> torch.Tensor:
        """``projx`` of each point rescaled into the safe range first (``_rescale``): no branch on the data."""
        y, q = _rescale(x, self.eps)
        if self.eps == 0 and not torch.compiler.is_compiling():
            _refuse(q == 0, f"{type(self).__name__}.projx got {{n}} zero vector(s) among {{total}} points: "
                            f"a zero vector has no direction, so no nearest point on the sphere; pass "
                            f"non-zero points (or eps > 0 to map zero to zero, as RMSNorm does)")
        if self.radius is None:
            # y is x where q = 1; where q > 1, eps is negligible against y's mean square.
            return F.rms_norm(y, y.shape[-1:], eps=self.eps)
        # x / sqrt(|x|^2 / r^2 + eps) = r y / sqrt(|y|^2 + eps r^2 / q^2), y = x / q: in range for any r.
        squares = y.pow(2).sum(-1, keepdim=True)
        if self.eps:
            squares = squares + (self.eps * self.radius * self.radius) / q.square()
        return y * (self.radius * torch.rsqrt(squares))

    def projx_affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``weight * projx(x) + bias`` (what ``AffineChart`` computes), fused where torch can."""
        return torch.addcmul(bias, self.projx(x), weight)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r = self.r(x)
        return super().proju(x / r, u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # Not geoopt's unit-sphere expmap on (x / r, u / r): for small u it falls back to
        # self.projx, which is ours (radius r), and the result would be scaled by r twice.
        r = self.r(x)
        angle = u.norm(dim=-1, keepdim=True) / r
        # sin(angle) / angle -> 1 as angle -> 0; the clamp keeps 0 / 0 out of values and gradients.
        safe = angle.clamp_min(torch.finfo(angle.dtype).tiny)
        return x * torch.cos(angle) + u * (torch.sin(safe) / safe)

    # logmap is geoopt's: it goes through our proju and dist, which already account for r.

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False) -> torch.Tensor:
        r = self.r(x)
        return super().dist(x / r, y / r, keepdim=keepdim) * r

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        # As geoopt's unit-sphere check on x / r (norms within atol + rtol of 1), saying which r.
        gap = (x.norm(dim=-1) / self.r(x) - 1).abs().max().item()
        if not gap <= atol + rtol:
            radius = f"sqrt(d) = {self.r(x):.6g}" if self.radius is None else f"{self.radius:g}"
            return False, f"`norm(x) != {radius}`: |norm(x) / r - 1| is up to {gap:.3g} (atol={atol}, rtol={rtol})"
        return True, None

    def random_uniform(self, *size, dtype=None, device=None) -> torch.Tensor:
        x = torch.randn(*size, dtype=dtype, device=device)
        return self.projx(x)

    random = random_uniform

    def extra_repr(self):
        radius = "sqrt(d)" if self.radius is None else f"{self.radius:g}"
        return f"radius={radius}, eps={self.eps:g}"


class SphereExact(Sphere):
    """``Sphere`` whose retraction is the exact exponential map (as ``geoopt.SphereExact``).

    ``retr(x, u)`` is ``expmap(x, proju(x, u))``: a Runge-Kutta step's increment has an O(h^2)
    normal part, which the exponential map alone would turn into a step off the sphere. Dropping
    that part caps Runge-Kutta methods at second order here; ``Sphere``'s projection keeps theirs.
    """

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.expmap(x, self.proju(x, u))


class RMSSphere(Sphere):
    """The sphere of radius ``sqrt(d)`` that RMSNorm without its gain projects onto.

    ``Sphere(radius=None)`` by its name; ``projx`` is ``F.rms_norm`` itself.

    Args:
        eps: RMSNorm's epsilon (0 gives the exact projection).
    """

    name = "RMSSphere"

    def __init__(self, eps: float = 0.0):
        super().__init__(radius=None, eps=eps)


class LayerNormSphere(Sphere):
    """The mean-zero sphere of radius ``sqrt(d)``: what LayerNorm without affine projects onto.

    ``projx`` is ``F.layer_norm`` itself (fused, and bit-compatible with the layer it stands for).

    Args:
        eps: LayerNorm's epsilon (0 gives the exact projection).
    """

    name = "LayerNormSphere"

    def __init__(self, eps: float = 0.0):
        super().__init__(radius=None, eps=eps)

    def _project_on_subspace(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True)

    def check_dimension(self, d: int) -> None:
        """Raise ``ValueError`` unless points of ``d`` coordinates can lie on this sphere (``d >= 2``)."""
        if d < 2:
            raise ValueError(
                f"LayerNormSphere needs at least 2 coordinates, got d = {d}: the mean-zero sphere in "
                f"{d} dimension has no points (LayerNorm maps every input to 0)"
            )

    def _layer_norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.layer_norm(x, weight, bias, eps)``, with points out of the safe range rescaled first."""
        self.check_dimension(x.shape[-1])
        shape = x.shape[-1:]
        if not torch.compiler.is_compiling():
            # Eager: F.layer_norm's kernel, kept if every point's 1/std was in range (one read-back).
            lo, hi = _bounds(x)
            out, _, rstd = torch.native_layer_norm(x, shape, weight, bias, self.eps)
            if _all_within(rstd, 1 / hi, None if self.eps >= lo * lo else 1 / lo):  # rstd <= eps^-1/2
                return out
            if self.eps == 0:
                top = x.detach().amax(-1)
                _refuse((top == x.detach().amin(-1)) & top.isfinite(),
                        "LayerNormSphere.projx got {n} constant point(s) among {total}: their mean-zero part is "
                        "0, which has no direction to normalise; pass non-constant points (or eps > 0 to map "
                        "them to 0, as LayerNorm does)")
        return F.layer_norm(_rescale(x, self.eps)[0], shape, weight, bias, eps=self.eps)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return self._layer_norm(_float32(x), None, None).to(x.dtype)

    def projx_affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            return super().projx_affine(x, weight, bias)
        return self._layer_norm(x, weight, bias)  # nn.LayerNorm exactly

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        mean = x.mean(-1).abs().max()
        if mean > atol * math.sqrt(x.shape[-1]):
            return False, f"`x` has non-zero mean {mean.item():.3g}"
        return super()._check_point_on_manifold(x, atol=atol, rtol=rtol)
