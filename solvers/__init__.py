"""Manifold-aware ODE solvers for PyTorch.

Object API (in the spirit of diffrax): a solver is a tableau plus a small class, variants wrap
solvers, and one loop (``integrate``) with one controller does every solve::

    import torch
    from manifolds import Sphere
    from solvers import RungeKutta, RK4, ConstantStepSize, integrate
    f = lambda t, y: torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]).expand_as(y), y)  # a rotation
    y0, t = Sphere().projx(torch.randn(8, 3)), torch.linspace(0, 1, 11)
    sol = integrate(f, y0, t, solver=RungeKutta(RK4), manifold=Sphere(), controller=ConstantStepSize(0.1))
    sol.ys, sol.stats.nfe

torchdiffeq-style façade: ``solvers.odeint(f, y0, t, method="rk4", manifold=Sphere(), options={"step_size": 0.1})``.
``solvers.register_torchdiffeq()`` adds ``manifold_<method>`` names to ``torchdiffeq.odeint``.
"""

from . import defaults
from .base import AdaptiveSolver, Piecewise, Solver, StepResult, Term
from .checkpointing import checkpointed_steps
from .cnf import CNF
from .controllers import ConstantStepSize, PIController
from .divergence import DIVERGENCE_METHODS, divergence
from .flow_matching import FlowMatching, conditional_velocity, flow_matching_loss, geodesic, geodesic_maps
from .errors import BoundaryError, NonFiniteError, OffManifoldError, SolverError, StepSizeError
from .interface import odeint, odeint_adjoint, register_torchdiffeq
from .lie_group import RKMK
from .methods import ADAPTIVE, METHODS, make_controller, make_solver
from .runge_kutta import RungeKutta
from .solve import GRADIENT_MODES, Solution, SolveStats, integrate
from .splitting import SCHEMES, Split
from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, RK4, ButcherTableau

__all__ = [
    "BOSH3", "DOPRI5", "EULER", "HEUN", "MIDPOINT", "RK4", "ButcherTableau",
    "AdaptiveSolver", "Piecewise", "Solver", "StepResult", "Term",
    "CNF", "FlowMatching", "conditional_velocity", "flow_matching_loss", "geodesic", "geodesic_maps",
    "ConstantStepSize", "PIController", "RKMK", "RungeKutta", "Split",
    "ADAPTIVE", "METHODS", "make_controller", "make_solver", "odeint", "odeint_adjoint", "register_torchdiffeq",
    "DIVERGENCE_METHODS", "divergence", "GRADIENT_MODES", "Solution", "SolveStats", "checkpointed_steps", "defaults", "integrate", "SCHEMES",
    "BoundaryError", "NonFiniteError", "OffManifoldError", "SolverError", "StepSizeError",
]
