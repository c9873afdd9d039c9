"""Manifold-aware ODE solvers for PyTorch.

Object API (in the spirit of diffrax)::

    from solvers import RungeKutta, RK4, ConstantStepSize, integrate
    sol = integrate(f, y0, t, solver=RungeKutta(RK4), manifold=Sphere(), controller=ConstantStepSize(0.1))
    sol.ys, sol.stats.nfe

torchdiffeq-style façade: ``solvers.odeint(f, y0, t, method="rk4", manifold=Sphere(), options={"step_size": 0.1})``.
Importing this package registers ``manifold_<method>`` names with ``torchdiffeq.odeint``.
"""

from .checkpointing import checkpointed_steps
from .controllers import ConstantStepSize, PIController
from .errors import NonFiniteError, OffManifoldError, SolverError, StepSizeError
from .lie_group import RKMK
from .odeint import METHODS, make_solver, odeint, odeint_adjoint, register_torchdiffeq
from .runge_kutta import RungeKutta
from .solve import Solution, SolveStats, integrate
from .splitting import SCHEMES, split_step
from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, RK4, ButcherTableau

register_torchdiffeq()

__all__ = [
    "BOSH3", "DOPRI5", "EULER", "HEUN", "MIDPOINT", "RK4", "ButcherTableau",
    "ConstantStepSize", "PIController", "RKMK", "RungeKutta",
    "METHODS", "make_solver", "odeint", "odeint_adjoint", "register_torchdiffeq",
    "Solution", "SolveStats", "checkpointed_steps", "integrate", "SCHEMES", "split_step",
    "NonFiniteError", "OffManifoldError", "SolverError", "StepSizeError",
]
