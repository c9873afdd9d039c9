"""The contract between the solve loop and a solver, and the shapes of what a solve is given.

A solver advances a state by one step and says how it did (``StepResult``); ``integrate`` (the one
loop) decides where the steps go, counts field evaluations, checks the state, checkpoints and
restarts. A field is a callable ``f(t, x)``, a sequence of ``Term`` (for solvers that split a
field into parts, ``Split``), or a ``Piecewise`` field whose parts change at given times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["AdaptiveSolver", "Piecewise", "Solver", "StepResult", "Term"]


class StepResult(NamedTuple):
    """What one step returns.

    Attributes:
        y: the state after the step (on the manifold).
        error: the local error estimate, a tangent vector at the step's start (adaptive
            solvers), or None.
        k_last: the field value at the new state, to be passed back as ``k_first`` (FSAL
            solvers), or None.
        interpolant: dense output, ``s -> `` the ambient point at ``t + s h`` for ``s`` in
            ``[0, 1]`` (the loop projects it onto the manifold), or None.
    """

    y: torch.Tensor
    error: torch.Tensor | None = None
    k_last: torch.Tensor | None = None
    interpolant: Callable[[float], torch.Tensor] | None = None


class Term(NamedTuple):
    """A field and the manifold its steps retract onto (None: the solve's manifold)."""

    field: Any  # a callable f(t, x), or for Split a sequence of Terms
    manifold: Any = None


@runtime_checkable
class Solver(Protocol):
    """What ``integrate`` needs of a solver.

    Attributes:
        order: the order of the method.
        error_order: the order of its embedded error estimate, or None (fixed steps only).
        fsal: ``step`` returns ``k_last``, the field at the new state, to reuse as ``k_first``.
        strict: the method needs the state on the manifold (it projects field values onto the
            tangent space or moves by a group action); False for relaxed steps, which retract
            any ambient point.
    """

    order: int
    error_order: int | None
    fsal: bool
    strict: bool

    def step(self, f: Callable, t: float, x: torch.Tensor, h: float, manifold,
             k_first: torch.Tensor | None = None) -> StepResult:
        """Advance ``x`` from ``t`` by ``h`` (negative: backwards); ``k_first`` is the field value
        at ``(t, x)`` when the loop already has it (FSAL)."""
        ...


@runtime_checkable
class AdaptiveSolver(Solver, Protocol):
    """A solver with an error estimate also gives the field value its first stage uses (the
    step-size controller starts from it)."""

    def field_value(self, f: Callable, t: torch.Tensor, x: torch.Tensor, manifold) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class Piecewise:
    """A field that changes at given times: a Transformer's layers, one parameter set per unit of time.

    Piece ``i`` holds on ``[breaks[i], breaks[i + 1]]``. Fixed-step solves put a grid point on every
    break; adaptive solves restart there (an embedded error estimate does not see a jump or a kink
    inside a step). ``piece(i)`` is called when the solve enters piece ``i`` and returns its
    ``Term``: the field and the manifold of the state on that piece (e.g. each post-LN layer's own
    affine chart).

    Args:
        breaks: increasing times, ``len(breaks) = number of pieces + 1``; they must cover the
            output times.
        piece: ``piece(i) -> Term``.
    """

    breaks: Sequence[float]
    piece: Callable[[int], Term]

    def __post_init__(self):
        b = [float(x) for x in self.breaks]
        if len(b) < 2 or any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"Piecewise breaks must be at least two strictly increasing times, got {b}")
        object.__setattr__(self, "breaks", tuple(b))

    def __len__(self) -> int:
        return len(self.breaks) - 1

    def index(self, a: float, b: float) -> int:
        """The piece that holds the interval between ``a`` and ``b`` (two consecutive knots)."""
        mid, i = 0.5 * (a + b), 0  # a plain scan: torch.compile traces it, not bisect
        while i + 1 < len(self) and self.breaks[i + 1] <= mid:
            i += 1
        return i
