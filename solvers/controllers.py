"""Step-size controllers: a solver proposes a step and an error, a controller decides."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .defaults import ATOL, DT_MIN, MAX_NFE, MAX_STEPS, RTOL

__all__ = ["ConstantStepSize", "PIController"]


@dataclass
class ConstantStepSize:
    """Fixed steps: either a step size, or a number of equal steps per output interval.

    Between consecutive output times the interval is split into ``ceil(length / step_size)`` equal
    steps, so every output time is a grid point (no interpolation off the manifold).

    Intervals are counted between consecutive output times and the breaks of a ``Piecewise``
    field, whichever come first.

    Args:
        step_size: the largest step to take.
        steps: the number of steps per interval (exclusive with ``step_size``).
        max_steps: a solve whose plan has more steps is refused before any work, with the count.
    """

    step_size: float | None = None
    steps: int | None = None
    max_steps: int = MAX_STEPS

    def __post_init__(self):
        if (self.step_size is None) == (self.steps is None):
            raise ValueError("give exactly one of step_size and steps")
        if self.step_size is not None and not (
            isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size > 0
        ):
            raise ValueError(f"step_size must be a positive finite number, got {self.step_size!r}")
        if self.steps is not None and not _positive_int(self.steps):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not _positive_int(self.max_steps):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")

    def grid(self, t0: float, t1: float) -> int:
        """Number of steps between ``t0`` and ``t1``."""
        if self.steps is not None:
            return int(self.steps)
        # The relative slack keeps 1.0 / 0.1 from becoming 11 steps through rounding, also when
        # the times were float32 (0.1 is then 0.10000000149): a step may exceed step_size by 1e-6.
        return max(1, math.ceil(abs(t1 - t0) / self.step_size * (1 - 1e-6)))


def _positive_int(n) -> bool:
    # bool is an int, and "3" is not: both are mistakes worth naming.
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


@dataclass
class PIController:
    """Proportional-integral step-size control (Hairer, Norsett & Wanner II, IV.2).

    ``h_new = h * clip(safety * e_n^(-beta1/k) * e_{n-1}^(beta2/k), factor_min, factor_max)``
    with ``k`` the error estimator's order + 1 and ``e`` the RMS of
    ``error / (atol + rtol * max(|x|, |x_new|))`` (``error`` is a tangent vector). A step is
    accepted when ``e <= 1``.

    Args:
        rtol: relative tolerance.
        atol: absolute tolerance.
        beta1: exponent of the current error, divided by k (Hairer's 0.7).
        beta2: exponent of the previous accepted error, divided by k (0 gives an I-controller).
        safety: safety factor.
        factor_min: smallest step ratio.
        factor_max: largest step ratio.
        dt0: size of the first step, positive whatever the direction of integration (None:
            chosen by Hairer's rule, one extra field evaluation).
        dt_min: the step floor; reaching it raises ``StepSizeError``.
        max_nfe: cap on field evaluations; reaching it raises ``StepSizeError``.
        max_steps: cap on accepted steps; reaching it raises ``StepSizeError``.
    """

    rtol: float = RTOL
    atol: float = ATOL
    beta1: float = 0.7
    beta2: float = 0.4
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    dt0: float | None = None
    dt_min: float = DT_MIN
    max_nfe: int = MAX_NFE
    max_steps: int = MAX_STEPS

    def __post_init__(self):
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(f"need rtol, atol >= 0, not both 0; got {self.rtol}, {self.atol}")
        if self.dt0 is not None and not (math.isfinite(self.dt0) and self.dt0 > 0):
            raise ValueError(
                f"the first step must be a positive finite size (the direction comes from t), got {self.dt0}"
            )
        if not (math.isfinite(self.dt_min) and self.dt_min >= 0):
            raise ValueError(f"dt_min must be a non-negative finite number, got {self.dt_min}")
        for name in ("max_nfe", "max_steps"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    def error_norm(self, error: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor) -> float:
        scale = self.atol + self.rtol * torch.maximum(x.abs(), x_new.abs())
        e = (error.detach() / scale.detach()).pow(2).mean().sqrt().item()
        return e if math.isfinite(e) else math.inf

    def initial_step(self, f, t0: float, x0, k0, order: int, manifold, direction: float) -> float:
        """Hairer's starting step (one extra field evaluation beyond ``k0``)."""
        if self.dt0 is not None:
            return direction * self.dt0
        scale = self.atol + self.rtol * x0.detach().abs()
        d0 = (x0.detach() / scale).pow(2).mean().sqrt().item()
        d1 = (k0.detach() / scale).pow(2).mean().sqrt().item()
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        x1 = manifold.retr(x0, direction * h0 * k0)
        k1 = f(torch.tensor(t0 + direction * h0, dtype=x0.dtype), x1)
        d2 = ((k1 - k0).detach() / scale).pow(2).mean().sqrt().item() / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        return direction * min(100 * h0, h1)

    def decide(
        self, error_norm: float, prev_error: float, h: float, error_order: int
    ) -> tuple[bool, float, float]:
        """Judge a step of size ``h`` with scaled error ``error_norm``.

        Returns ``(accept, next_h, prev_error)``; ``prev_error`` (start with 1.0) is the last
        accepted error, the controller's only memory, carried by the caller.
        """
        k = error_order + 1
        if error_norm == 0.0:
            factor = self.factor_max
        elif not math.isfinite(error_norm):
            factor = self.factor_min
        else:
            factor = self.safety * error_norm ** (-self.beta1 / k) * prev_error ** (self.beta2 / k)
            factor = min(self.factor_max, max(self.factor_min, factor))
        accept = error_norm <= 1.0
        if accept:
            prev_error = max(error_norm, 1e-4)
        else:
            factor = min(factor, 1.0)
        return accept, h * factor, prev_error
