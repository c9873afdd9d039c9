"""Every private upstream API this project touches lives here, each behind one function.

Each names the upstream version it was written against; ``tests/test_compat.py`` fails loudly when
an upstream release moves or changes it.
"""

from __future__ import annotations

import importlib

__all__ = ["torchdiffeq_solvers"]


def torchdiffeq_solvers() -> dict:
    """torchdiffeq's method-name registry, ``torchdiffeq._impl.odeint.SOLVERS`` (torchdiffeq 0.2.5).

    torchdiffeq has no public way to add a method; ``register_torchdiffeq`` writes our
    ``manifold_<method>`` names into this dict.
    """
    # The module, not the function of the same name that torchdiffeq._impl exports.
    return importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
