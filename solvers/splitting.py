"""Operator splitting: step ``f_1 + ... + f_n`` one field at a time.

A Transformer block is the Lie-Trotter splitting of ``v_attn + v_ffn``: an attention substep, then
an FFN substep, each a full step of the solver followed by that substep's retraction.
"""

from __future__ import annotations

__all__ = ["split_step", "SCHEMES"]

SCHEMES = ("lie", "strang")


def split_step(solver, terms, t: float, x, h: float, scheme: str = "lie"):
    """One step of size ``h`` of a split field.

    Args:
        solver: any solver with ``step(f, t, x, h, manifold)``.
        terms: sequence of ``(f, manifold)``: each field with the manifold its substeps retract
            onto.
        scheme: "lie" (Lie-Trotter, first order: ``phi^n_h o ... o phi^1_h``) or "strang"
            (second order: half steps of ``f_1..f_{n-1}``, a full step of ``f_n``, half steps back).

    Returns:
        The state after the step.
    """
    if scheme == "lie":
        for f, manifold in terms:
            x = solver.step(f, t, x, h, manifold)[0]
        return x
    if scheme == "strang":
        *outer, (f_last, m_last) = terms
        for f, manifold in outer:
            x = solver.step(f, t, x, h / 2, manifold)[0]
        x = solver.step(f_last, t, x, h, m_last)[0]
        for f, manifold in reversed(outer):
            x = solver.step(f, t + h / 2, x, h / 2, manifold)[0]
        return x
    raise ValueError(f"unknown splitting scheme {scheme!r}; expected one of {SCHEMES}")
