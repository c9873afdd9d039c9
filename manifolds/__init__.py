"""Manifolds for manifold-aware ODE solvers, on geoopt's ``Manifold`` API.

Any geoopt manifold works with the solvers that need only ``proju``/``retr``/``projx``; these add
spheres of any radius, the LayerNorm sphere, the post-LN affine chart, and the SO(n) actions that
Lie-group solvers need.
"""

from geoopt import Euclidean

from .chart import AffineChart
from .lie import LowRankSkew, LowRankSphereAction, SOnAction, SphereAction, StiefelAction, bracket
from .sphere import LayerNormSphere, Sphere, SphereExact

__all__ = [
    "AffineChart",
    "Euclidean",
    "LayerNormSphere",
    "LowRankSkew",
    "LowRankSphereAction",
    "SOnAction",
    "Sphere",
    "SphereAction",
    "SphereExact",
    "StiefelAction",
    "bracket",
]
