"""The Gaussian SVFlow of the paper's 2-D toy (see docs/maths.md#the-gaussian-toy)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GaussianMixtureField"]


class GaussianMixtureField(nn.Module):
    """``v(x) = sum_z q(z|x) (mu_z - x) / s^2`` with ``q(z|x) = softmax(A x + b)``.

    ``p(x|z) = N(mu_z, s^2 I)`` and a uniform prior ``p(z)``.

    Args:
        means: ``(K, d)`` component means.
        sigma: the shared standard deviation ``s``.
        learn_posterior: whether ``A, b`` are trainable (else ``A = 0, b = 0``: a uniform q).
    """

    def __init__(self, means: torch.Tensor, sigma: float = 1.0, learn_posterior: bool = True):
        super().__init__()
        K, d = means.shape
        self.means = nn.Parameter(means.clone())
        self.sigma = sigma
        self.posterior = nn.Linear(d, K)
        nn.init.zeros_(self.posterior.weight)
        nn.init.zeros_(self.posterior.bias)
        self.posterior.requires_grad_(learn_posterior)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        """Variational posterior ``q(z|x)``, ``(..., K)``."""
        return self.posterior(x).softmax(-1)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` for every z, ``(..., K)``."""
        d = x.shape[-1]
        sq = (x[..., None, :] - self.means).pow(2).sum(-1)
        return -0.5 * sq / self.sigma**2 - 0.5 * d * torch.log(torch.tensor(2 * torch.pi * self.sigma**2))

    def true_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """``p(z|x)`` under the uniform prior."""
        return self.log_likelihood(x).softmax(-1)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """``E_q[log p(x|z)] - KL(q(z|x) || p(z))`` with a uniform prior."""
        q = self.q(x)
        K = q.shape[-1]
        kl = (q * (q.clamp_min(1e-30).log() + torch.log(torch.tensor(float(K))))).sum(-1)
        return (q * self.log_likelihood(x)).sum(-1) - kl

    def forward(self, t, x: torch.Tensor, **context) -> torch.Tensor:
        scores = (self.means - x[..., None, :]) / self.sigma**2  # (..., K, d)
        return (self.q(x)[..., None] * scores).sum(-2)
