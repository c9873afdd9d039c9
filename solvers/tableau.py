"""Butcher tableaus as data. One stepping loop (``runge_kutta.py``) serves them all."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as Fr

__all__ = ["ButcherTableau", "EULER", "MIDPOINT", "HEUN", "RK4", "BOSH3", "DOPRI5"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Attributes:
        name: short name.
        order: order of the propagated solution ``b``.
        c: stage times, length ``s``.
        a: strictly lower-triangular stage weights, row ``i`` has ``i`` entries.
        b: solution weights, length ``s``.
        b_low: weights of the embedded lower-order solution (adaptive methods), or None.
        fsal: the last stage is the field at the step's end (first-same-as-last).
        b_mid: weights of the continuous extension at the step's midpoint (dense output: with
            the two ends and their field values it fixes a quartic interpolant), or None.
    """

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    b_low: tuple | None = None
    fsal: bool = False
    b_mid: tuple | None = None

    def __post_init__(self):
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s:
            raise ValueError(f"{self.name}: c, a and b must all have {s} stages")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"{self.name}: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > 1e-14:
                raise ValueError(f"{self.name}: row {i} of a must sum to c[{i}]")
        for name, weights, total in (("b", self.b, 1), ("b_low", self.b_low, 1), ("b_mid", self.b_mid, 0.5)):
            if weights is not None and (len(weights) != s or abs(sum(weights) - total) > 1e-14):
                raise ValueError(f"{self.name}: {name} must have {s} entries summing to {total}")
        if self.fsal and (self.c[-1] != 1 or tuple(self.a[-1]) + (0.0,) != tuple(self.b)):
            raise ValueError(f"{self.name}: FSAL needs c[-1] = 1, a[-1] = b and b[-1] = 0")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def error_order(self) -> int | None:
        """Order of the embedded solution (None for fixed-step methods)."""
        return None if self.b_low is None else self.order - 1

    @property
    def b_err(self) -> tuple | None:
        """``b - b_low``: the weights of the local error estimate."""
        if self.b_low is None:
            return None
        return tuple(x - y for x, y in zip(self.b, self.b_low))


# Written as exact fractions, stored as Python floats (float64), cast to the state dtype on use.
def _f(*xs):
    return tuple(float(Fr(x)) for x in xs)


EULER = ButcherTableau("euler", 1, c=_f(0), a=((),), b=_f(1))
MIDPOINT = ButcherTableau("midpoint", 2, c=_f(0, "1/2"), a=((), _f("1/2")), b=_f(0, 1))
HEUN = ButcherTableau("heun", 2, c=_f(0, 1), a=((), _f(1)), b=_f("1/2", "1/2"))
RK4 = ButcherTableau(
    "rk4",
    4,
    c=_f(0, "1/2", "1/2", 1),
    a=((), _f("1/2"), _f(0, "1/2"), _f(0, 0, 1)),
    b=_f("1/6", "1/3", "1/3", "1/6"),
)
# Bogacki-Shampine 3(2).
BOSH3 = ButcherTableau(
    "bosh3",
    3,
    c=_f(0, "1/2", "3/4", 1),
    a=((), _f("1/2"), _f(0, "3/4"), _f("2/9", "1/3", "4/9")),
    b=_f("2/9", "1/3", "4/9", 0),
    b_low=_f("7/24", "1/4", "1/3", "1/8"),
    fsal=True,
)
# Dormand-Prince 5(4).
DOPRI5 = ButcherTableau(
    "dopri5",
    5,
    c=_f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    a=(
        (),
        _f("1/5"),
        _f("3/40", "9/40"),
        _f("44/45", "-56/15", "32/9"),
        _f("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _f("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"),
    ),
    b=_f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0),
    b_low=_f("5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40"),
    fsal=True,
    # Shampine's continuous extension at theta = 1/2 (Hairer, Norsett & Wanner I, II.6).
    b_mid=tuple(float(Fr(x) / 2) for x in (
        "6025192743/30085553152", 0, "51252292925/65400821598", "-2691868925/45128329728",
        "187940372067/1594534317056", "-1776094331/19743644256", "11237099/235043384",
    )),
)
