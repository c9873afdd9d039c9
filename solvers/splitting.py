"""Operator splitting as a solver that wraps a solver: step ``f_1 + ... + f_n`` one part at a time.

A Transformer block is the Lie-Trotter splitting of ``v_attn + v_ffn``: an attention substep, then
an FFN substep, each a full step of the inner solver followed by that substep's retraction.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import Solver, StepResult, Term

__all__ = ["SCHEMES", "Split"]

SCHEMES = ("lie", "strang")


class Split:
    """Lie-Trotter or Strang splitting of a field given as a sequence of ``Term``.

    ``integrate`` passes the terms as the field: ``integrate((Term(f1, M1), Term(f2, M2)), ...)``.
    Each substep is a full step of the inner solver on one term, retracting onto that term's
    manifold (None: the solve's manifold).

    Args:
        solver: the solver of each substep.
        scheme: "lie" (first order: ``phi^n_h o ... o phi^1_h``) or "strang" (second order: half
            steps of ``f_1..f_{n-1}``, a full step of ``f_n``, half steps back).
    """

    error_order = None
    fsal = False

    def __init__(self, solver: Solver, scheme: str = "lie"):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown splitting scheme {scheme!r}; expected one of {SCHEMES}")
        self.solver = solver
        self.scheme = scheme

    @property
    def order(self) -> int:
        return min(self.solver.order, 1 if self.scheme == "lie" else 2)

    @property
    def strict(self) -> bool:
        return self.solver.strict

    def __repr__(self):
        return f"Split({self.solver!r}, scheme={self.scheme!r})"

    def step(self, f: Sequence[Term], t: float, x: torch.Tensor, h: float, manifold, k_first=None) -> StepResult:
        """One step of size ``h``; ``f`` is the sequence of terms. ``k_first`` must be None: a
        split field has no single field value to reuse."""
        if k_first is not None:
            raise ValueError("Split steps take no k_first: each substep evaluates its own term")
        terms = [(term.field, manifold if term.manifold is None else term.manifold) for term in f]
        if self.scheme == "lie":
            for field, m in terms:
                x = self.solver.step(field, t, x, h, m).y
            return StepResult(x)
        *outer, (f_last, m_last) = terms
        for field, m in outer:
            x = self.solver.step(field, t, x, h / 2, m).y
        x = self.solver.step(f_last, t, x, h, m_last).y
        for field, m in reversed(outer):
            x = self.solver.step(field, t + h / 2, x, h / 2, m).y
        return StepResult(x)
