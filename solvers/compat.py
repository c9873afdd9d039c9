"""Every private upstream API this project touches lives here.

One function per private name, each saying which upstream version it was written against; import
private upstream names nowhere else. One private hook is overridden rather than called, so it cannot be wrapped here:
``geoopt.Sphere._project_on_subspace`` (geoopt 0.5.1), through which ``manifolds.LayerNormSphere``
restricts geoopt's ``proju`` (and its own ``projx``) to the mean-zero plane; ``manifolds``
sits below this package, and ``tests/test_compat.py`` checks that geoopt still calls the hook.
This module sits in ``solvers``, the lowest package that reaches
upstream privates, so that ``svflow_ode`` (Lightning's) and ``solvers`` (torchdiffeq's) share it;
nothing is imported until a function is called, so the core install needs none of the packages. ``tests/test_compat.py`` has a test per function that fails
loudly when the name disappears or stops doing what the function relies on: after an upgrade, run
it first. The upstream modules are imported on first use, so that one package's privates cost
nothing to code that uses another's.
"""

from __future__ import annotations

import importlib
from importlib import metadata

__all__ = ["given_hyperparameters", "is_torchdiffeq_adjoint_backward", "torchdiffeq_solvers", "upstream_defect"]


def given_hyperparameters() -> dict | None:
    """The configuration ``LightningCLI`` is building the current ``LightningModule`` from, else ``None``.

    While LightningCLI instantiates a module (with ``load_from_checkpoint_support``, the default), it
    puts the module's parsed configuration, class paths of nested objects included, plus an
    ``_instantiator`` entry, into a context variable that ``save_hyperparameters`` reads: those are
    the hyperparameters then saved, so that ``load_from_checkpoint`` can rebuild nested objects.
    Outside it, ``None``.

    Wraps ``lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters`` (a ``ContextVar``);
    written against lightning 2.6.
    """
    return _private("lightning", "lightning.pytorch.core.mixins.hparams_mixin", "_given_hyperparameters",
                    "2.6").get()


def torchdiffeq_solvers() -> dict:
    """torchdiffeq's method-name registry, ``torchdiffeq._impl.odeint.SOLVERS``; written against 0.2.5.

    torchdiffeq has no public way to add a method: ``solvers.register_torchdiffeq`` writes our
    ``manifold_<method>`` names into this dict.
    """
    # The module, not the function of the same name that torchdiffeq._impl exports.
    return _private("torchdiffeq", "torchdiffeq._impl.odeint", "SOLVERS", "0.2.5")


def is_torchdiffeq_adjoint_backward(func) -> bool:
    """Whether torchdiffeq hands a solver ``func`` to solve its adjoint's backward pass.

    torchdiffeq 0.2.5's ``odeint_adjoint`` solves a local function named ``augmented_dynamics``
    (``torchdiffeq/_impl/adjoint.py``), wrapped in its private ``_PerturbFunc``/``_TupleFunc``
    classes, each keeping the wrapped function as ``base_func``.
    """
    for _ in range(8):  # the wrappers nest a few deep
        if getattr(func, "__name__", None) == "augmented_dynamics":
            return True
        func = getattr(func, "base_func", None)
        if func is None:
            return False
    return False


def _parts(manifold):
    """The manifold, or the parts of a geoopt product manifold, recursively."""
    import geoopt

    if isinstance(manifold, geoopt.ProductManifold):
        return [p for m in manifold.manifolds for p in _parts(m)]
    return [manifold]


def upstream_defect(manifold, gradient: str, fixed_steps: bool) -> str | None:
    """What breaks the backward pass of a solve on ``manifold`` in a known geoopt 0.5.1 defect, or None.

    - geoopt's Stereographic family (PoincareBall, ...) and Lorentz compute in TorchScript
      functions that ``torch.utils.checkpoint`` cannot recompute (the backward pass fails in the
      TorchScript interpreter): two-level checkpointing of fixed steps breaks there.
    - ``geoopt.EuclideanStiefel.retr`` fixes its QR signs in place, so backprop through any step
      fails with "modified by an inplace operation"; ``manifolds.Stiefel`` does it out of place.

    The forward pass is sound in both, so the solve goes on and its backward pass raises this message
    before autograd reaches the defect (``integrate`` hooks it onto the solution).
    """
    import geoopt

    for part in _parts(manifold):
        if gradient == "checkpoint" and fixed_steps and isinstance(part, (geoopt.Stereographic, geoopt.Lorentz)):
            return (
                f"gradient='checkpoint' on {type(part).__name__}: geoopt computes it in TorchScript functions that "
                f"torch.utils.checkpoint cannot recompute; use gradient='backprop' or 'adjoint' (or an adaptive method)"
            )
        if gradient == "backprop" and type(part) is geoopt.EuclideanStiefel:
            return (
                "gradient='backprop' on geoopt.EuclideanStiefel: its retr fixes the QR signs in place, which breaks "
                "the backward pass; use manifolds.Stiefel (the same manifold, out of place) or gradient='checkpoint'"
            )
    return None


def _private(package: str, module: str, name: str, written_against: str):
    """``module.name``, or an ``ImportError`` saying which private upstream name is gone and where it is used."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"{module}.{name}, a private {package} name that solvers.compat was written against "
            f"({package} {written_against}), is gone in the installed {package} {_version(package)}: "
            f"adapt solvers/compat.py (tests/test_compat.py checks each such name)"
        ) from err


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"
