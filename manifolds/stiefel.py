"""The Stiefel manifold and SO(n), with derivatives that stay finite and correct on the manifold.

geoopt 0.5.1's Stiefel manifolds break gradient-based solves three ways:

- ``geoopt.Stiefel()`` (canonical metric) has a ``proju`` that is not a projection (it is the
  canonical metric's gradient conversion): a tangent ``U`` moves, so strict mode, which projects
  the field with ``proju``, integrates a different ODE;
- ``projx`` is an SVD, whose backward divides by differences of singular values: NaN at an
  orthonormal matrix, where they are all 1 (RKMK ends every step with ``projx``);
- ``EuclideanStiefel.retr`` fixes the signs of its QR factor in place, which autograd refuses.

``Stiefel`` here keeps the Euclidean metric (``<U, V> = tr(U^T V)``), so ``proju`` is the
orthogonal projection ``U - X sym(X^T U)``: idempotent. ``projx`` is the polar factor computed by
a Newton–Schulz iteration (matrix products only) run to convergence: its derivative at an
orthonormal ``X`` is the tangent projection, finite. ``retr`` is the QR retraction with the signs
fixed out of place; it maps every ambient matrix near the manifold to the manifold and fixes the
manifold's points, so a Runge–Kutta step ending in ``retr`` keeps the tableau's order.

Both classes subclass ``geoopt.EuclideanStiefel``: whatever dispatches on ``geoopt.Stiefel``
(``solvers.odeint``'s choice of Lie-group action) takes them as they are.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F
from geoopt.utils import size2shape

__all__ = ["SpecialOrthogonal", "Stiefel", "polar"]

_MAX_ITERATIONS = 100
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _skew(a: torch.Tensor) -> torch.Tensor:
    return (a - a.transpose(-1, -2)) / 2


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``A (A^T A)^{-1/2}`` of ``a`` ``(..., n, p)``, ``n >= p``.

    It is the nearest matrix with orthonormal columns. Newton–Schulz, ``X <- X - X (X^T X - I) / 2``,
    converges quadratically for singular values in ``(0, sqrt 3)``; a matrix with
    ``|A^T A - I|_F >= 1`` is first divided by its Frobenius norm, which puts them in ``(0, 1]``.
    The iteration stops two steps after ``max |X^T X - I|`` falls below ``sqrt(eps)``: the first
    takes the value to rounding, the second the derivative (each step's derivative is off by
    the residual it starts from). So a point already on the manifold still costs two steps, and
    its derivative is the tangent projection, not the identity.

    Raises ``ValueError`` for a (nearly) rank-deficient matrix, whose polar factor is not unique;
    a non-finite input, or a zero matrix, comes back non-finite (the solve loop names the step).
    """
    x = a.float() if a.dtype in _LOW_PRECISION else a
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    far = (x.transpose(-1, -2) @ x - eye).norm(dim=(-2, -1), keepdim=True) >= 1
    x = torch.where(far, x / x.norm(dim=(-2, -1), keepdim=True), x)
    tol, converged = math.sqrt(torch.finfo(x.dtype).eps), 0
    for _ in range(_MAX_ITERATIONS):
        residual = x.transpose(-1, -2) @ x - eye
        gap = residual.abs().max().item()
        x = x - 0.5 * (x @ residual)
        converged += gap <= tol
        if converged == 2 or not math.isfinite(gap):
            return x.to(a.dtype)
    raise ValueError(
        f"polar: Newton-Schulz did not converge in {_MAX_ITERATIONS} steps (max |X^T X - I| = {gap:.3g}): "
        f"the matrix is (nearly) rank-deficient and has no unique nearest orthonormal matrix; keep the "
        f"state on the manifold (retr) instead of projecting a degenerate one"
    )


def _qf(a: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``a = QR`` with ``diag(R) >= 0``: unique, and ``a`` itself when orthonormal."""
    q, r = torch.linalg.qr(a)
    # Out of place: geoopt's in-place sign fix overwrites QR's output, which its backward needs.
    signs = 1 - 2 * (r.diagonal(dim1=-2, dim2=-1) < 0).to(q.dtype)
    return q * signs.unsqueeze(-2)


def _gap(a: torch.Tensor) -> float:
    return a.detach().abs().max().item() if a.numel() else 0.0


class Stiefel(geoopt.EuclideanStiefel):
    """``{X in R^{n x p} : X^T X = I}``, Euclidean metric; derivatives finite on and near it.

    - ``proju(X, U) = U - X sym(X^T U)``: the orthogonal projection, idempotent;
    - ``projx``: the polar factor by Newton–Schulz (``polar``), finite backward on the manifold;
    - ``retr(X, U) = qf(X + U)``: QR with ``diag(R) > 0``, signs fixed out of place;
    - ``expmap``: geoopt's exact geodesic (a matrix exponential of a ``2p x 2p`` block).
    """

    name = "Stiefel"

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return polar(x)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _qf(x + u)

    def random(self, *size, dtype=None, device=None) -> torch.Tensor:
        """A Haar-distributed point (``qf`` of a Gaussian matrix)."""
        self._assert_check_shape(size2shape(*size), "x")
        return _qf(torch.randn(size2shape(*size), dtype=dtype, device=device))

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        gap = _gap(x.transpose(-1, -2) @ x - eye)
        if not gap <= atol:
            return False, f"`X^T X != I`: max |X^T X - I| = {gap:.3g} > atol={atol:g}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        gap = _gap(x.transpose(-1, -2) @ u + u.transpose(-1, -2) @ x)
        if not gap <= atol:
            return False, f"`X^T U + U^T X != 0`: its largest entry is {gap:.3g} > atol={atol:g}"
        return True, None


def _special(q: torch.Tensor) -> torch.Tensor:
    """Flip the last column of each ``q`` in O(n) with ``det(q) < 0``: a point of SO(n).

    Near SO(n) nothing is flipped; a reflection is at distance 2 or more from SO(n), where the
    nearest rotation would need the smallest singular vector (an SVD), so this takes one that is
    on SO(n) but not necessarily nearest. The sign is a constant for autograd.
    """
    flip = (torch.linalg.det(q.detach()) < 0).to(q.dtype)  # (...,)
    signs = F.pad((1 - 2 * flip).unsqueeze(-1), (q.shape[-1] - 1, 0), value=1.0)  # (..., n)
    return q * signs.unsqueeze(-2)


class SpecialOrthogonal(Stiefel):
    """The rotation group ``SO(n) = {X in R^{n x n} : X^T X = I, det X = 1}``, bi-invariant metric.

    SO(n) is a connected component of the square Stiefel manifold O(n), so ``Stiefel``'s metric,
    polar ``projx`` and QR ``retr`` carry over; both then fix the sign of the determinant
    (``_special``: a no-op near SO(n)). Tangent vectors are ``X Omega`` with ``Omega`` skew:

    - ``proju(X, U) = X skew(X^T U)``, idempotent;
    - ``expmap(X, U) = X matrix_exp(skew(X^T U))``: the group geodesic (``skew`` is the identity on
      tangent ``U``, and keeps the result a rotation for any ``U``).

    With ``StiefelAction(SpecialOrthogonal())`` an RKMK solve moves the state by rotations.
    """

    name = "SO(n)"

    def _check_shape(self, shape, name):
        ok, reason = super()._check_shape(shape, name)
        if ok and shape[-1] != shape[-2]:
            return False, f"`{name}` must be square for SO(n), got shape {tuple(shape[-2:])}"
        return ok, reason

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return _special(polar(x))

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x @ _skew(x.transpose(-1, -2) @ u)

    egrad2rgrad = proju

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _special(_qf(x + u))

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x @ torch.linalg.matrix_exp(_skew(x.transpose(-1, -2) @ u))

    def random(self, *size, dtype=None, device=None) -> torch.Tensor:
        """A Haar-distributed rotation (right-multiplying O(n)'s Haar measure by a reflection keeps it)."""
        return _special(super().random(*size, dtype=dtype, device=device))

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        ok, reason = super()._check_point_on_manifold(x, atol=atol, rtol=rtol)
        if ok:
            det = torch.linalg.det(x.detach()).min().item()
            if not det > 0:
                return False, f"`det(X) = {det:.3g}`: X is a reflection, not a rotation (det must be +1)"
        return ok, reason
