"""The action of the rotation group SO(n) on the sphere and on the Stiefel manifold.

Lie-group integrators (Runge-Kutta-Munthe-Kaas) move a point ``x`` by ``exp(theta) x`` with
``theta`` in the Lie algebra so(n) of skew-symmetric matrices, so the state never leaves the
manifold. An action supplies the vocabulary they need:

- ``generator(x, u)``: a skew ``xi`` with ``xi x = proju(x, u)`` (a tangent vector as an algebra
  element);
- ``exp(theta)``: the group exponential (the matrix exponential);
- ``act(g, x)``: apply a group element to a point;
- ``bracket(a, b)``: the commutator, from which ``dexpinv(bracket, theta, k, order)`` builds the
  inverse derivative of ``exp``, truncated after the Bernoulli terms an integrator of the given
  order needs.

The action decides how algebra elements are stored: ``SphereAction`` and ``StiefelAction`` use
dense ``n x n`` matrices (O(n^3) per token); ``LowRankSphereAction`` keeps them factored through
the few vectors an RKMK step has seen (O(n) per token for a given number of stages), with the same
results. An element only needs ``+`` and multiplication by a number.

An RKMK step asks its action for a ``Frame`` (``frame(x, stages)``): the step's names for points
and elements. The default frame uses the methods above as they are. ``LowRankSphereAction``'s
frames compute a whole step in few, small operations (on CPU a step's cost is mostly the count of
tensor operations, not their size): in coordinates of the span of ``x`` and the step's field
values (``_SpanFrame``), or on the 2-sphere with so(3) as R^3 and the cross product
(``_CrossFrame``); both apply ``exp`` to a point by its Taylor polynomial, at the degree that
keeps it within the dtype's rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .sphere import Sphere
from .stiefel import Stiefel

__all__ = ["Frame", "LowRankSkew", "LowRankSphereAction", "SOnAction", "SphereAction", "StiefelAction", "bracket",
           "dexpinv"]

# Bernoulli numbers B_0..B_4 in dexpinv(theta, k) = sum_j B_j / j! ad_theta^j (k).
_BERNOULLI_OVER_FACTORIAL = (1.0, -1.0 / 2.0, 1.0 / 12.0, 0.0, -1.0 / 720.0)


def bracket(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix commutator ``[a, b] = ab - ba`` over the last two dimensions."""
    return a @ b - b @ a


def dexpinv(bracket, theta, k, order: int):
    """``dexp_theta^{-1}(k)`` truncated after the ``ad^j`` terms with ``j <= order - 2``, for
    elements with ``bracket``, ``+`` and ``*`` by a number (no bracket at all for ``order <= 2``).

    That truncation is enough for an RKMK method of the given order (Munthe-Kaas 1999).
    """
    out, ad = k, k
    for j in range(1, max(order - 1, 1)):
        ad = bracket(theta, ad)
        if _BERNOULLI_OVER_FACTORIAL[j]:
            out = out + _BERNOULLI_OVER_FACTORIAL[j] * ad
    return out


class SOnAction:
    """Shared algebra of SO(n): bracket, exponential and dexpinv on dense matrices (``dexpinv`` needs
    only ``bracket``, ``+`` and ``*``, so it serves any representation). Subclasses define points
    and tangents."""

    manifold = None
    bracket = staticmethod(bracket)

    def exp(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(theta)

    def dexpinv(self, theta: torch.Tensor, k: torch.Tensor, order: int) -> torch.Tensor:
        """``dexp_theta^{-1}(k)`` truncated for an RKMK method of the given order (``dexpinv``)."""
        return dexpinv(self.bracket, theta, k, order)

    def frame(self, x: torch.Tensor, size: int) -> Frame:
        """The workspace of one RKMK step from ``x`` that takes at most ``size`` field values."""
        return Frame(self, x)


class SphereAction(SOnAction):
    """SO(n) acting on the sphere of ``Sphere(radius)`` by matrix-vector product.

    Points have shape ``(..., n)``; algebra elements ``(..., n, n)``.
    """

    def __init__(self, manifold: Sphere | None = None):
        self.manifold = Sphere(1.0) if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # xi = (u x^T - x u^T) / r^2 gives xi x = u - x (x.u) / r^2 = proju(x, u).
        r2 = x.pow(2).sum(-1, keepdim=True).unsqueeze(-1)  # (..., 1, 1)
        outer = u.unsqueeze(-1) * x.unsqueeze(-2)  # (..., n, n)
        return (outer - outer.transpose(-1, -2)) / r2

    def act(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (g @ x.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LowRankSkew:
    """The skew matrix ``theta = P S P^T``, kept factored: ``P`` ``(..., n, k)`` has the ``columns``.

    ``S`` ``(..., k, k)`` is skew; ``P`` need not be orthonormal or even of full rank (an RKMK
    step's stage points are combinations of its earlier vectors), so nothing divides by a norm.
    Sums and brackets match columns by identity: the elements of one RKMK step share their
    columns, which keeps ``k`` at most 2 per stage (a field value and the point it was taken at)
    instead of growing with every concatenation. Sharing only saves work: a column that appears
    twice is still exact.
    """

    columns: tuple[torch.Tensor, ...]  # each (..., n)
    S: torch.Tensor  # (..., k, k)

    def __mul__(self, c: float) -> LowRankSkew:
        return LowRankSkew(self.columns, c * self.S)

    __rmul__ = __mul__

    def __add__(self, other: LowRankSkew) -> LowRankSkew:
        columns, (a, b) = _common(self, other)
        return LowRankSkew(columns, a + b)

    def dense(self) -> torch.Tensor:
        """The ``(..., n, n)`` matrix (for tests and the dense reference)."""
        pt = _rows(self.columns)
        return pt.transpose(-1, -2) @ self.S @ pt


def _rows(columns: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``P^T`` ``(..., k, n)``: stacked as rows, a contiguous copy of each column."""
    return torch.stack(columns, -2)


def _common(*elements: LowRankSkew) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """The union of the elements' columns (by identity), and each ``S`` written in that basis."""
    index = {}  # id(column) -> position
    columns = []
    # Widest first: an RKMK step's narrower elements are then contiguous blocks of the union.
    for e in sorted(elements, key=lambda e: -len(e.columns)):
        for c in e.columns:
            if id(c) not in index:
                index[id(c)] = len(columns)
                columns.append(c)
    k, out = len(columns), []
    for e in elements:
        positions = [index[id(c)] for c in e.columns]
        before, after = positions[0], k - positions[0] - len(positions)
        if positions == list(range(before, before + len(positions))):  # a block: zero-pad around it
            out.append(F.pad(e.S, (before, after, before, after)) if len(positions) < k else e.S)
        else:  # S_union = E^T S E with E the one-hot (k_e, k) map; a repeated column sums
            select = F.one_hot(torch.tensor(positions), k).to(e.S)
            out.append(select.transpose(0, 1) @ e.S @ select)
    return tuple(columns), out


_J = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # u x^T - x u^T = [u x] J [u x]^T


class _LowRankRotation(NamedTuple):
    """``exp(theta)``, applied lazily: acting on one point needs a smaller exponential."""

    theta: LowRankSkew


class LowRankSphereAction(SOnAction):
    """``SphereAction`` with algebra elements stored as ``LowRankSkew``: exact, and O(n) per token.

    Every element an RKMK step builds lies in so(n) restricted to the span of the step's points
    and field values, so with ``G = P^T P`` (``k x k``):

    - ``generator(x, u)`` is ``(u x^T - x u^T) / r^2``: columns ``(u, x)``;
    - ``[P S1 P^T, P S2 P^T] = P (S1 G S2 - S2 G S1) P^T``;
    - ``exp(P S P^T) x = x + P phi(S G) S P^T x`` with ``phi(z) = (e^z - 1) / z``, read off the
      last column of ``expm([[S G, S P^T x], [0, 0]])`` (a ``(k + 1) x (k + 1)`` exponential, no
      inverse); ``exp`` only records ``theta`` and ``act`` does this.

    Points have shape ``(..., n)``. Matches ``SphereAction`` to rounding. An RKMK step does not
    use these elements: its ``frame`` (``_CrossFrame`` for ``n = 3``, else ``_SpanFrame``) works in
    coordinates of the same span, with far fewer operations.
    """

    def __init__(self, manifold: Sphere | None = None):
        self.manifold = Sphere(1.0) if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> LowRankSkew:
        r2 = x.pow(2).sum(-1)[..., None, None]  # (..., 1, 1)
        return LowRankSkew((u, x), _J.to(x) / r2)  # S (..., 2, 2)

    @staticmethod
    def bracket(a: LowRankSkew, b: LowRankSkew) -> LowRankSkew:
        columns, (sa, sb) = _common(a, b)
        pt = _rows(columns)
        sgs = sa @ (pt @ pt.transpose(-1, -2)) @ sb  # (..., k, k); its transpose is sb G sa
        return LowRankSkew(columns, sgs - sgs.transpose(-1, -2))

    def exp(self, theta: LowRankSkew) -> _LowRankRotation:
        return _LowRankRotation(theta)

    def act(self, g: _LowRankRotation, x: torch.Tensor) -> torch.Tensor:
        # Products with one vector are broadcast sums: a batched matmul with an inner or outer
        # dimension of 1 is slow on CPU, above all in the backward pass.
        pt, s = _rows(g.theta.columns), g.theta.S
        k = s.shape[-1]
        ptx = (pt * x.unsqueeze(-2)).sum(-1, keepdim=True)  # (..., k, 1): P^T x
        top = s @ torch.cat([pt @ pt.transpose(-1, -2), ptx], -1)  # (..., k, k + 1): [S G, S P^T x]
        block = torch.cat([top, torch.zeros_like(top[..., :1, :])], -2)  # (..., k + 1, k + 1)
        w = torch.linalg.matrix_exp(block)[..., :k, k:]  # (..., k, 1): phi(S G) S P^T x
        return x + (w * pt).sum(-2)

    def frame(self, x: torch.Tensor, size: int) -> Frame:
        return _CrossFrame(x) if x.shape[-1] == 3 else _SpanFrame(x, size)


class Frame:
    """The workspace of one RKMK step from the point ``x``: how the step names its points and
    algebra elements.

    A step needs the generators of field values (``generator``), sums of elements (``+`` and
    multiplication by a number), their ``bracket``, and the points ``exp(theta) x``:
    ``move(theta)`` returns a handle to one, ``point(handle)`` the tensor; ``base`` is the handle
    of ``x``. This one, the default, uses the action's elements and points as they are;
    ``LowRankSphereAction``'s frames compute in coordinates.
    """

    def __init__(self, action: SOnAction, x: torch.Tensor):
        self.action, self.base = action, x

    def point(self, p):
        return p

    def generator(self, p, u: torch.Tensor):
        return self.action.generator(p, u)

    def bracket(self, a, b):
        return self.action.bracket(a, b)

    def move(self, theta):
        return self.action.act(self.action.exp(theta), self.base)


class _SpanFrame(Frame):
    """An RKMK step on the sphere in coordinates of the span of its vectors: O(n) per token and
    few operations on small matrices.

    Every point and field value of a step from ``x`` lies in the span of ``B = [x, u_1, ..., u_s]``,
    ``x`` and the step's field values (a stage point is ``exp(theta) x`` with ``theta`` on the span
    of the earlier ones), with Gram matrix ``G = B^T B``. A point is its coordinates ``c`` (the
    point ``B c``); an element is ``theta = B S B^T`` with ``S`` skew, zero on the columns not
    filled yet; ``M = S G`` acts on coordinates as ``theta`` acts on points (``theta B = B M``):

    - the generator of ``u`` at ``B c`` is ``S = (e_j c^T - c e_j^T) / r^2``, ``u`` the column ``j``;
    - ``exp(theta) x = B exp(M) e_0``, by the Taylor polynomial (``_taylor_degree``) with the
      powers ``M^i e_0`` computed two at a time, ``M^2 [M^(2i) e_0, M^(2i+1) e_0]``;
    - the bracket is ``[B S1 B^T, B S2 B^T] = B (S1 G S2 - S2 G S1) B^T``.

    A move computes on the columns filled so far (``theta`` and ``G`` are zero past them), so its
    coordinates are as long as that: ``point`` reads them on the first columns.

    The small matrices are stored batch-last, ``(s + 1, s + 1, *batch)``: a product of tiny
    matrices is then one broadcast product and one sum (a batched matmul of 5 x 5 matrices is
    several times slower on CPU, its backward more). The elements are ``SphereAction``'s in other
    coordinates: results match to rounding.
    """

    def __init__(self, x: torch.Tensor, size: int):
        self.size = k = size + 1  # x and the field values
        self.const = _constants(k, x.dim() - 1, x.dtype, x.device)
        self.base = self.const.eye[0][:1]  # the coordinates of x
        self.columns = [x]
        r2 = x.pow(2).sum(-1)
        self.inv_r2 = 1.0 / r2
        self.gram = self.const.pattern[0] * r2  # (k, k, *batch); the columns to come are zero

    def _append(self, u: torch.Tensor) -> int:
        j = len(self.columns)
        if j >= self.size:
            raise ValueError(f"this frame takes {self.size - 1} field values: it cannot take another")
        self.columns.append(u)
        self.rows = torch.stack(self.columns, 0)  # B^T, (j + 1, *batch, n)
        # Row and column j of G are B^T u; the diagonal entry is halved, then counted twice.
        half = self.const.row[j][:, : j + 1] * (self.rows * u).sum(-1)
        half = F.pad(half, (0, 0) * (half.dim() - 2) + (0, self.size - j - 1))
        self.gram = self.gram + half + half.transpose(0, 1)
        return j

    def point(self, c: torch.Tensor) -> torch.Tensor:
        """The point of coordinates ``c``: on the first ``len(c)`` columns (those filled when it
        was made; a move computes only there)."""
        if c is self.base:
            return self.columns[0]
        return (c.unsqueeze(-1) * self.rows[: c.shape[0]]).sum(0)

    def generator(self, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        j = self._append(u)
        if c is self.base:
            return self.const.pattern[j] * self.inv_r2
        c = F.pad(c * self.inv_r2, (0, 0) * (c.dim() - 1) + (0, self.size - c.shape[0]))
        half = self.const.eye[j].unsqueeze(1) * c  # e_j c^T / r^2
        return half - half.transpose(0, 1)

    def bracket(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        p = _matmul(_matmul(a, self.gram), b)  # [B a B^T, B b B^T] = B (a G b - b G a) B^T
        return p - p.transpose(0, 1)

    def move(self, theta: torch.Tensor) -> torch.Tensor:
        j = len(self.columns)  # theta and G are zero past the filled columns: exp is computed on them
        m = _matmul(theta[:j, :j], self.gram[:j, :j])
        m2 = _matmul(m, m)
        # |theta|_2^2 <= |theta|_F^2 / 2 = -tr(M^2) / 2.
        degree = _degree(lambda: -0.5 * m2.diagonal(0, 0, 1).sum(-1).min().item(), m.dtype)
        if degree is None:
            return torch.linalg.matrix_exp(m.movedim((0, 1), (-2, -1)))[..., 0].movedim(-1, 0)
        blocks = [torch.stack([self.const.eye[0][:j].expand_as(m[:, 0]), m[:, 0]], 1)]  # [e_0, M e_0]
        while 2 * len(blocks) <= degree:
            blocks.append(_matmul(m2, blocks[-1]))
        powers = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]  # (k, degree + 1 or 2, *batch)
        return (powers * _inverse_factorials(powers, 1)).sum(1)


class _CrossFrame(Frame):
    """An RKMK step on the 2-sphere (``n = 3``): so(3) is R^3 with the cross product.

    The generator ``(u x^T - x u^T) / r^2`` is ``v -> w x v`` with ``w = x x u / r^2``, the bracket
    is the cross product of the vectors, and ``exp(theta) x`` is the Taylor polynomial of
    ``w x .`` applied to ``x`` (``_taylor_degree``). The elements are ``SphereAction``'s written as
    vectors: results match to rounding.
    """

    def __init__(self, x: torch.Tensor):
        self.base = x
        self.inv_r2 = 1.0 / x.pow(2).sum(-1, keepdim=True)

    def generator(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.linalg.cross(p, u) * self.inv_r2

    def bracket(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.cross(a, b)

    def move(self, theta: torch.Tensor) -> torch.Tensor:
        x = self.base
        degree = _degree(lambda: torch.linalg.vector_norm(theta, dim=-1).max().item() ** 2, x.dtype)  # |theta|_2 = |w|
        if degree is None:
            return (torch.linalg.matrix_exp(_hat(theta)) @ x.unsqueeze(-1)).squeeze(-1)
        powers = [x]
        for _ in range(degree):
            powers.append(torch.linalg.cross(theta, powers[-1]))
        powers = torch.stack(powers, 0)
        return (powers * _inverse_factorials(powers, 0)).sum(0)


def _hat(w: torch.Tensor) -> torch.Tensor:
    """The skew matrix of ``v -> w x v``."""
    zero = torch.zeros_like(w[..., 0])
    w1, w2, w3 = w.unbind(-1)
    return torch.stack([zero, -w3, w2, w3, zero, -w1, -w2, w1, zero], -1).unflatten(-1, (3, 3))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for batch-last matrices ``(k, k, *batch)`` and ``(k, r, *batch)``."""
    return (a.unsqueeze(2) * b).sum(1)


class _Constants(NamedTuple):
    eye: torch.Tensor  # (k, k, 1, ...): eye[j] is e_j, (k, 1, ...)
    row: list  # e_j (1 - e_j / 2)^T: row[j] * g puts g in row j, its entry j halved
    pattern: list  # e_j e_0^T - e_0 e_j^T for j > 0, e_0 e_0^T for j = 0


_CONSTANTS = {}


def _constants(k: int, batch_dims: int, dtype, device) -> _Constants:
    """A frame's constants, shaped for coordinates ``(k, *batch)``."""
    key = (k, batch_dims, dtype, device)
    if key not in _CONSTANTS:
        ones = (1,) * batch_dims
        eye = torch.eye(k, dtype=dtype, device=device).reshape(k, k, *ones)
        pattern = [e.unsqueeze(1) * eye[0] - eye[0].unsqueeze(1) * e for e in eye]
        pattern[0] = eye[0].unsqueeze(1) * eye[0]
        row = [e.unsqueeze(1) * (1.0 - 0.5 * e) for e in eye]
        _CONSTANTS[key] = _Constants(eye, row, pattern)
    return _CONSTANTS[key]


def _inverse_factorials(powers: torch.Tensor, dim: int) -> torch.Tensor:
    """``1 / i!`` along dimension ``dim`` (the power ``i``) of ``powers``, broadcast over the rest."""
    shape = [1] * powers.dim()
    shape[dim] = powers.shape[dim]
    key = (tuple(shape), powers.dtype, powers.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor([1.0 / math.factorial(i) for i in range(shape[dim])], dtype=powers.dtype,
                                       device=powers.device).reshape(shape)
    return _CONSTANTS[key]


def _degree(norm2, dtype) -> int | None:
    """The Taylor degree for an operator whose squared spectral norm is at most ``norm2()`` (read
    back from the tensors: the degree is data-dependent); None under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return None
    return _taylor_degree(math.sqrt(max(norm2(), 0.0)), dtype)


def _taylor_degree(norm: float, dtype) -> int | None:
    """The degree ``m`` at which the Taylor polynomial of ``exp`` applied to a unit vector is
    within a quarter of ``dtype``'s epsilon for an operator of norm at most ``norm``, its
    derivative too (the tail from ``norm^m / m!``); None past ``_TAYLOR_MAX_NORM``."""
    if not norm <= _TAYLOR_MAX_NORM:  # also NaN
        return None
    tol = 0.25 * torch.finfo(dtype).eps
    term, m = 1.0, 0
    while True:  # the tail sum_{j >= m} norm^j / j! <= term / (1 - norm / (m + 1))
        if term <= tol * (1.0 - norm / (m + 1)):
            return max(m, 1)
        m += 1
        term *= norm / m


_TAYLOR_MAX_NORM = 2.0


class StiefelAction(SOnAction):
    """SO(n) acting on the Stiefel manifold ``{X in R^{n x p} : X^T X = I}`` by left product.

    Works for ``manifolds.Stiefel`` and ``manifolds.SpecialOrthogonal`` (``p = n``), the default
    being ``Stiefel()``. The generator does not call the manifold's ``proju``: it moves ``X`` by the
    orthogonal projection of ``U`` onto the tangent space, which is what ``Stiefel.proju`` returns
    (geoopt's canonical ``Stiefel.proju`` is not that projection, and would give a wrong ``xi``).
    """

    def __init__(self, manifold=None):
        self.manifold = Stiefel() if manifold is None else manifold

    def generator(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # xi = U X^T - X U^T - X skew(X^T U) X^T: each term is skew, so xi is for any U; with
        # X^T X = I, xi X = U - X sym(X^T U), the tangent part of U (U itself when U is tangent).
        xt = x.transpose(-1, -2)
        a = u @ xt
        xax = x @ (xt @ u - u.transpose(-1, -2) @ x) @ xt / 2
        return a - a.transpose(-1, -2) - xax

    def act(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return g @ x
