"""Likelihood-implied posteriors and the divergences between posteriors.

See docs/maths.md#the-likelihood-implied-posterior and
docs/maths.md#measurements-on-pretrained-models.

An SVFlow field ``sum_z q(z|x) s_z(x)`` pairs a posterior q with scores ``s_z = kappa_z mu_z``, the
gradients of vMF log-likelihoods ``log p(x|z) = log C_d(kappa_z) + kappa_z mu_z . x``. On the unit
sphere the scores therefore imply a posterior of their own (uniform prior),

    p(z|x) ∝ C_d(|s_z|) exp(s_z . x̂),

and the diagnostics compare q with it. All functions here work in float64 on the last axis
(the latent: context tokens for attention, experts for a mixture of experts), with a boolean
``visible`` mask of the latents a query may use (causal and padding masks).
"""

from __future__ import annotations

import torch

from .bessel import log_vmf_normaliser

__all__ = [
    "visible_keys",
    "likelihood_log_posterior",
    "kl_divergence",
    "kl_to_uniform",
]


def visible_keys(T: int, causal: bool, attention_mask: torch.Tensor | None, device=None) -> torch.Tensor:
    """Which keys each query sees: ``(B or 1, 1, T, T)`` bool, the complement of the attention bias.

    A query that sees no key (padding before any token under a causal mask) is given every key,
    as the attention bias's finite fill value does to its softmax; the diagnostics leave such
    padding queries out of every average.

    Args:
        T: sequence length.
        causal: whether query i sees only keys ``j <= i``.
        attention_mask: ``(B, T)``, 1 for tokens and 0 for padding, or None.
    """
    visible = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril()
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    return visible | ~visible.any(-1, keepdim=True)


def likelihood_log_posterior(
    scores: torch.Tensor, x: torch.Tensor, visible: torch.Tensor, normaliser: bool = True
) -> torch.Tensor:
    """``log p(j|x_i) = log C_d(|s_j|) + s_j . x̂_i - log Z_i`` over the visible latents j.

    Args:
        scores: ``(..., J, d)`` the scores ``s_j`` (per head for attention: ``W_o^h W_v^h x_j``).
        x: ``(..., I, d)`` the states ``x_i`` the field reads (broadcast against ``scores``'s
            leading axes); only their directions enter.
        visible: bool, broadcastable to ``(..., I, J)``.
        normaliser: include ``log C_d(|s_j|)`` (the likelihood's own normaliser; ``d`` is the
            last axis) or drop it (then ``p`` is the softmax of ``s_j . x̂_i`` alone).

    Returns:
        ``(..., I, J)`` float64 log-probabilities, ``-inf`` on invisible latents.
    """
    scores, x = scores.double(), x.double()
    direction = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    logits = direction @ scores.transpose(-1, -2)  # (..., I, J)
    if normaliser:
        logits = logits + log_vmf_normaliser(scores.norm(dim=-1), scores.shape[-1])[..., None, :]
    return logits.masked_fill(~visible, -torch.inf).log_softmax(-1)


def _safe_log(q: torch.Tensor) -> torch.Tensor:
    # log q where q > 0 and 0 elsewhere: those terms are q log(.) = 0 in the limit, and the
    # gradient must not meet log(0) or -inf - -inf on its way back.
    return torch.where(q > 0, q, torch.ones_like(q)).log()


def kl_divergence(q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``KL(q || p) = sum_j q_j (log q_j - log p_j)`` over the last axis (float64).

    Latents with ``q_j = 0`` (invisible, or underflowed) contribute 0, as in the limit.

    Args:
        q: probabilities.
        log_p: the other distribution's log-probabilities (``-inf`` allowed where ``q = 0``).
    """
    q = q.double()
    positive = q > 0
    return (q * (_safe_log(q) - torch.where(positive, log_p, torch.zeros_like(log_p)))).sum(-1)


def kl_to_uniform(q: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``KL(q || U) = log n + sum_j q_j log q_j`` with U uniform over the ``n`` visible latents."""
    q = q.double()
    return (q * _safe_log(q)).sum(-1) + visible.sum(-1).double().log()
