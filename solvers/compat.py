"""Every private upstream API this project touches lives here.

One function per private name, each saying which upstream version it was written against; import
private upstream names nowhere else. It sits in ``solvers``, the lowest package that reaches
upstream privates, so that ``svflow_ode`` (Lightning's) and ``solvers`` (torchdiffeq's) share it;
nothing is imported until a function is called, so the core install needs none of the packages. ``tests/test_compat.py`` has a test per function that fails
loudly when the name disappears or stops doing what the function relies on: after an upgrade, run
it first. The upstream modules are imported on first use, so that one package's privates cost
nothing to code that uses another's.
"""

from __future__ import annotations

import importlib
from importlib import metadata

__all__ = ["given_hyperparameters", "torchdiffeq_solvers"]


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
