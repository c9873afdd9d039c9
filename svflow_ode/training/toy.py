"""The 2-D Gaussian-mixture data of the paper's toy (see docs/maths.md#the-gaussian-toy)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from .data import TRAIN, VAL, seeded_generator

__all__ = ["GaussianMixtureDataModule"]


class GaussianMixtureDataModule(L.LightningDataModule):
    """Points from ``n_components`` isotropic Gaussians with means evenly spaced on a circle.

    Batches are ``(x, labels)``: points ``(B, 2)`` and their component ``(B,)``. The training and
    validation sets are fixed tensors drawn from ``seed``; training batches are shuffled by a
    generator seeded by ``seed`` too.

    Args:
        n_components: mixture components (classes) K.
        radius: distance of the means from the origin.
        sigma: standard deviation of every component.
        n_train: training points.
        n_val: validation points.
        batch_size: points per batch.
        seed: seed of the points and of the shuffling.
    """

    def __init__(
        self,
        n_components: int = 4,
        radius: float = 3.0,
        sigma: float = 1.0,
        n_train: int = 4096,
        n_val: int = 1024,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if n_components < 1 or sigma <= 0 or n_train < 1 or n_val < 1 or batch_size < 1:
            raise ValueError("n_components, sigma, n_train, n_val and batch_size must be positive")
        angles = 2 * math.pi * torch.arange(n_components) / n_components
        self.means = radius * torch.stack([angles.cos(), angles.sin()], -1)  # (K, 2)
        self.sigma, self.batch_size, self.seed = sigma, batch_size, seed
        self.train_set = self._draw(n_train, seeded_generator(seed, TRAIN))
        self.val_set = self._draw(n_val, seeded_generator(seed, VAL))

    def _draw(self, n: int, generator: torch.Generator) -> TensorDataset:
        labels = torch.randint(len(self.means), (n,), generator=generator)
        x = self.means[labels] + self.sigma * torch.randn(n, 2, generator=generator)  # (n, 2)
        return TensorDataset(x, labels)

    def train_dataloader(self) -> DataLoader:
        shuffle = seeded_generator(self.seed, TRAIN, 1)  # a stream apart from the points' own
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
