"""Manifolds for manifold-aware ODE solvers, on geoopt's ``Manifold`` API.

Any geoopt manifold works with the solvers that need only ``proju``/``retr``/``projx``. This package
adds:

- spheres: ``Sphere(radius)`` (the unit sphere by default, as ``geoopt.Sphere()``), ``SphereExact``,
  ``RMSSphere`` (radius ``sqrt(d)``: what RMSNorm projects onto, also ``Sphere(radius=None)``), the
  LayerNorm sphere and the post-LN affine chart;
- ``Stiefel`` and ``SpecialOrthogonal`` (SO(n)): an idempotent ``proju``, and ``projx``/``retr``
  with finite, correct derivatives on the manifold (geoopt's SVD ``projx`` has a NaN backward
  there), and ``polar``, the polar factor they project with;
- the SO(n) actions that Lie-group solvers need (``SphereAction``, ``LowRankSphereAction``,
  ``StiefelAction``);
- ``check_contract``: a set-up check that a manifold's ``projx``/``proju``/``retr`` do what the
  solvers assume, raising ``ManifoldContractError`` (e.g. on geoopt's canonical ``Stiefel``);
- ``boundary_margin`` / ``at_boundary``: whether geoopt's Poincaré ball has pinned a state at its
  clip radius.
"""

from geoopt import Euclidean

from .boundary import at_boundary, boundary_margin
from .distributions import HaarSO3, Mixture, Product, StandardNormal, UniformSphere, VonMisesFisher, WrappedNormal
from .chart import AffineChart
from .contract import ManifoldContractError, check_contract
from .lie import LowRankSkew, LowRankSphereAction, SOnAction, SphereAction, StiefelAction, bracket
from .sphere import LayerNormSphere, RMSSphere, Sphere, SphereExact
from .stiefel import SpecialOrthogonal, Stiefel, polar

__all__ = [
    "AffineChart",
    "Euclidean",
    "HaarSO3",
    "LayerNormSphere",
    "LowRankSkew",
    "LowRankSphereAction",
    "ManifoldContractError",
    "Mixture",
    "Product",
    "RMSSphere",
    "SOnAction",
    "SpecialOrthogonal",
    "StandardNormal",
    "Sphere",
    "SphereAction",
    "SphereExact",
    "Stiefel",
    "StiefelAction",
    "UniformSphere",
    "VonMisesFisher",
    "WrappedNormal",
    "at_boundary",
    "boundary_margin",
    "bracket",
    "check_contract",
    "polar",
]
