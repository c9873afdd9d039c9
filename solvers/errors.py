"""Errors a solve raises: each names where (time, step) and how (step size, NFE) it failed."""

import torch

__all__ = ["BoundaryError", "SolverError", "NonFiniteError", "StepSizeError", "OffManifoldError", "describe"]


class SolverError(RuntimeError):
    """Base class for failures during a solve."""


class NonFiniteError(SolverError):
    """The state became NaN or infinite."""


class StepSizeError(SolverError):
    """An adaptive solve hit its step floor or its NFE cap."""


class BoundaryError(SolverError):
    """The state reached a manifold's numerical boundary (the Poincare ball's clip radius)."""


class OffManifoldError(ValueError):
    """The initial state is not on the manifold."""


def describe(x: torch.Tensor) -> str:
    """A tensor in one line for a non-finite report: shape, NaN and inf counts, range of the rest."""
    x = x.detach()
    finite = x[torch.isfinite(x)].double()
    rest = (f"finite entries min {finite.min():.4g}, max {finite.max():.4g}, mean {finite.mean():.4g}"
            if finite.numel() else "no finite entries")
    return f"shape {tuple(x.shape)}, {int(x.isnan().sum())} nan and {int(x.isinf().sum())} inf; {rest}"
