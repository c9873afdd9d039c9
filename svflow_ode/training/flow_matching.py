"""Riemannian flow matching with Lightning: a module, data modules with known target densities, and the CLI.

    python -m svflow_ode.training.flow_matching fit --config experiments/configs/rfm_vmf_mixture.yaml
    svflow-ode-rfm fit --config experiments/configs/rfm_vmf_mixture.yaml --trainer.max_steps 200

The CLI is ``SVFlowCLI``'s (one-line configuration errors, checked ``--ckpt_path``, reserved run
directories, finite guard, atomic checkpoints, SIGTERM checkpoint) with the data's ``manifold``
linked to the model instead of the language model's sizes.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifolds import HaarSO3, Mixture, Sphere, SpecialOrthogonal, UniformSphere, VonMisesFisher, WrappedNormal
from solvers.compat import given_hyperparameters
from solvers.flow_matching import FlowMatching

from .checkpoints import check_compatible
from .cli import SVFlowCLI, SVFlowParser
from .data import TRAIN, VAL, seeded_generator
from .module import warmup_cosine

__all__ = ["FlowMatchingCLI", "LitFlowMatching", "ManifoldDataModule", "TangentMLP", "VMFMixtureDataModule",
           "SPACES", "space", "main"]


def space(name: str):
    """``(manifold, base, point_shape)`` of a named space: "sphere" (S^2, uniform base), "so3" (Haar base)
    or "poincare_disk" (the 2-D ball of curvature -1, wrapped normal base of sigma 1 at the centre)."""
    if name == "sphere":
        return Sphere(1.0), UniformSphere(3), (3,)
    if name == "so3":
        return SpecialOrthogonal(), HaarSO3(), (3, 3)
    if name == "poincare_disk":
        base = WrappedNormal(torch.zeros(2, dtype=torch.float64), 1.0)
        return base.manifold, base, (2,)
    raise ValueError(f"unknown space {name!r}; expected one of {SPACES}")


SPACES = ("sphere", "so3", "poincare_disk")


class TangentMLP(nn.Module):
    """An MLP field ``(t, x) -> proju(x, MLP([x, sin/cos features of t]))`` on a named space.

    Args:
        manifold: the space's name (``SPACES``); it sets the point shape and the projection.
        hidden: width of the hidden layers.
        layers: hidden layers (>= 1).
        time_frequencies: frequencies ``1..K`` of the ``sin(2 pi k t)``, ``cos(2 pi k t)`` time features.
    """

    def __init__(self, manifold: str = "sphere", hidden: int = 128, layers: int = 3, time_frequencies: int = 4):
        super().__init__()
        if hidden < 1 or layers < 1 or time_frequencies < 0:
            raise ValueError(f"need hidden >= 1, layers >= 1, time_frequencies >= 0; got {hidden}, {layers}, "
                             f"{time_frequencies}")
        self.manifold_name = manifold
        self.manifold, _, self.point_shape = space(manifold)
        size = math.prod(self.point_shape)
        widths = [size + 1 + 2 * time_frequencies, *[hidden] * layers]
        blocks = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, size))
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(1, time_frequencies + 1), persistent=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.dim() - len(self.point_shape)]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(batch)[..., None]  # a scalar or one per point
        angles = t * self.frequencies.to(x)
        features = torch.cat([x.reshape(*batch, -1), t, angles.sin(), angles.cos()], -1)
        return self.manifold.proju(x, self.net(features).reshape(x.shape))


class LitFlowMatching(L.LightningModule):
    """Trains ``field`` by Riemannian flow matching from the space's base distribution to the data.

    Logs ``train/loss`` and ``val/loss`` (the flow-matching loss) and ``val/nll``: the held-out
    negative log-likelihood in nats of the flow as a CNF (``val_method`` with ``val_steps`` steps,
    exact divergence); with a data module that knows its target density, also ``val/target_nll``,
    the target's own cross-entropy on the same points, which no model beats on average.

    Args:
        field: the network ``field(t, x)`` (``t`` a scalar, or one time per point).
        manifold: the space's name (``SPACES``); under the CLI it comes from the data.
        lr: Adam's peak learning rate, cosine-decayed to ``min_lr`` over the run.
        min_lr: the learning rate at the end.
        warmup_steps: linear warm-up steps.
        max_steps: length of the schedule (default: the trainer's ``max_steps``).
        val_method: the solver of the held-out likelihood ("rk4", "dopri5", ...).
        val_steps: its fixed steps (ignored by adaptive methods).
    """

    def __init__(self, field: nn.Module, manifold: str = "sphere", lr: float = 3e-3, min_lr: float = 1e-4,
                 warmup_steps: int = 0, max_steps: int | None = None, val_method: str = "rk4", val_steps: int = 20):
        super().__init__()
        if not (math.isfinite(lr) and math.isfinite(min_lr) and 0 <= min_lr <= lr and lr > 0):
            raise ValueError(f"need finite 0 <= min_lr <= lr and lr > 0, got min_lr={min_lr}, lr={lr}")
        if warmup_steps < 0 or (max_steps is not None and max_steps < 1) or val_steps < 1:
            raise ValueError(f"need warmup_steps >= 0, max_steps >= 1, val_steps >= 1; got {warmup_steps}, "
                             f"{max_steps}, {val_steps}")
        own = getattr(field, "manifold_name", manifold)
        if own != manifold:
            raise ValueError(f"the field is built for {own!r} but the data live on {manifold!r}: "
                             f"set the field's manifold to {manifold!r}")
        # Under LightningCLI the hyperparameters are the configuration (the field's class path included).
        self.save_hyperparameters(ignore=None if given_hyperparameters() else ["field"])
        manifold_, base, _ = space(manifold)
        self.flow = FlowMatching(field, manifold_, base)
        self.lr, self.min_lr, self.warmup_steps, self.max_steps = lr, min_lr, warmup_steps, max_steps
        self.val_method, self.val_steps = val_method, val_steps

    def training_step(self, batch, batch_idx):
        (x1,) = batch
        loss = self.flow.loss(x1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(x1))
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        (x1,) = batch
        # The divergence differentiates the field: Lightning validates under inference mode, whose tensors
        # autograd refuses, so leave it and work on a normal copy of the batch.
        with torch.inference_mode(False), torch.enable_grad():
            x1 = x1.clone()
            loss = self.flow.loss(x1)
            options = {} if self.val_method in ("bosh3", "dopri5") else {"steps": self.val_steps}
            nll = -self.flow.cnf(method=self.val_method, options=options).log_prob(x1).detach()
        metrics = {"val/loss": loss.detach(), "val/nll": nll.mean()}
        target = getattr(self.trainer.datamodule, "target", None)
        if target is not None:
            metrics["val/target_nll"] = -target.log_prob(x1.double()).mean().to(x1.dtype)
        self.log_dict(metrics, prog_bar=True, on_epoch=True, batch_size=len(x1))

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` over ``lr`` (as ``LitSVFlow``'s: ``warmup_cosine``)."""
        return warmup_cosine(step, self.lr, self.min_lr, self.warmup_steps, self.max_steps or self.trainer.max_steps)

    def configure_optimizers(self):
        if not self.max_steps and self.trainer.max_steps < 1:
            raise ValueError("the learning-rate schedule needs trainer.max_steps or model.max_steps")
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_compatible(checkpoint, self)


class ManifoldDataModule(L.LightningDataModule):
    """Points from a ``target`` distribution on a named space: fixed training and validation sets drawn from ``seed``.

    Subclasses set ``manifold`` (a name in ``SPACES``) and ``target`` (``log_prob`` and ``sample``)
    before calling ``draw``. Batches are ``(x,)``, float32 points.
    """

    manifold: str
    target = None

    def draw(self, n_train: int, n_val: int, batch_size: int, seed: int) -> None:
        if n_train < 1 or n_val < 1 or batch_size < 1:
            raise ValueError(f"n_train, n_val and batch_size must be positive, got {n_train}, {n_val}, {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.train_set = TensorDataset(self.target.sample(n_train, dtype=torch.float64,
                                                          generator=seeded_generator(seed, TRAIN)).float())
        self.val_set = TensorDataset(self.target.sample(n_val, dtype=torch.float64,
                                                        generator=seeded_generator(seed, VAL)).float())

    def train_dataloader(self) -> DataLoader:
        shuffle = seeded_generator(self.seed, TRAIN, 1)  # a stream apart from the points' own
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class VMFMixtureDataModule(ManifoldDataModule):
    """A mixture of von Mises-Fisher distributions on S^2: a target with a known density.

    Args:
        means: the components' mean directions, 3 numbers each (normalised here).
        kappas: their concentrations (> 0).
        weights: their weights (default equal).
        n_train, n_val: training and validation points.
        batch_size: points per batch.
        seed: seed of the points and the shuffling.
    """

    manifold = "sphere"

    def __init__(self, means: list[list[float]] = ((0.0, 0.0, 1.0), (1.0, 0.0, -0.3), (-0.5, -0.8, -0.3)),
                 kappas: list[float] = (12.0, 8.0, 20.0), weights: list[float] | None = None,
                 n_train: int = 20000, n_val: int = 2000, batch_size: int = 256, seed: int = 0):
        super().__init__()
        if len(means) != len(kappas):
            raise ValueError(f"need one kappa per mean, got {len(means)} means and {len(kappas)} kappas")
        self.target = Mixture([VonMisesFisher(torch.tensor(m, dtype=torch.float64), k) for m, k in zip(means, kappas)],
                              None if weights is None else list(weights))
        self.draw(n_train, n_val, batch_size, seed)


class FlowMatchingCLI(SVFlowCLI):
    """``SVFlowCLI`` for ``LitFlowMatching``: the model's space is the data's."""

    links = {"data.manifold": "model.manifold"}


def run(args: list[str] | None = None, **kwargs) -> FlowMatchingCLI:
    """Run the command line with ``args`` (default ``sys.argv[1:]``); returns the finished CLI.
    ``kwargs`` go to ``FlowMatchingCLI``."""
    return FlowMatchingCLI(
        LitFlowMatching, ManifoldDataModule, subclass_mode_data=True, args=args, auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "svflow-ode-rfm"}, parser_class=SVFlowParser,
        **kwargs,
    )


def main() -> None:
    """The ``svflow-ode-rfm`` command; exit status as ``svflow-ode``'s (it returns None: a console
    script passes what ``main`` returns to ``sys.exit``)."""
    run()


if __name__ == "__main__":
    # Through the package, not this __main__ copy: configurations name the package's classes.
    from svflow_ode.training.flow_matching import main as package_main

    package_main()
