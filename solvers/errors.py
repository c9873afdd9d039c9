"""Errors a solve raises: each names where (time, step) and how (step size, NFE) it failed."""

__all__ = ["SolverError", "NonFiniteError", "StepSizeError", "OffManifoldError"]


class SolverError(RuntimeError):
    """Base class for failures during a solve."""


class NonFiniteError(SolverError):
    """The state became NaN or infinite."""


class StepSizeError(SolverError):
    """An adaptive solve hit its step floor or its NFE cap."""


class OffManifoldError(ValueError):
    """The initial state is not on the manifold."""
