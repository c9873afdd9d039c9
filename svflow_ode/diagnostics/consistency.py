"""The variational-consistency regulariser ``beta * KL(q(z|x) || p(z|x))`` for attention and MoE.

The flow ascends the evidence exactly when the posterior q equals the true posterior p(z|x) of
the scores' likelihoods (docs/maths.md#variational-consistency). The regulariser penalises the
gap, per field read:

- attention: q the attention posterior over the visible context, p the likelihood-implied vMF
  posterior of the same head (``posteriors.likelihood_log_posterior``), averaged over heads and
  real query tokens;
- mixture of experts: q the router's softmax over experts, p the experts' likelihood-implied
  posterior ``p(e|x) ∝ C_d(|f_e(x)|) exp(f_e(x) . x̂)``, with ``f_e(x)`` expert e's output read as
  its score (uniform prior over experts; every expert evaluated on every token), averaged over
  tokens.

The loss is the mean over the recorded field evaluations (one per layer with Euler) times beta.
By default gradients reach both sides (q's parameters and the scores' that define p); with
``detach_p`` p is a fixed target and only q is pulled towards it.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from ..fields import AttentionField, MoEField
from .posteriors import kl_divergence, likelihood_log_posterior, visible_keys
from .recording import on_calls

__all__ = [
    "PARTS",
    "expert_log_posterior",
    "attention_consistency",
    "moe_consistency",
    "consistency_recorder",
    "consistency_loss",
]

PARTS = ("attention", "moe")
_KINDS = {"attention": AttentionField, "moe": MoEField}


def expert_log_posterior(outputs: torch.Tensor, x: torch.Tensor, normaliser: bool = True) -> torch.Tensor:
    """``log p(e|x) = log C_d(|f_e|) + f_e . x̂ - log Z``: ``(..., E)`` float64.

    Args:
        outputs: ``(..., E, d)`` every expert's output ``f_e(x)``.
        x: ``(..., d)`` the state the experts read.
        normaliser: include the vMF normaliser ``C_d(|f_e|)``.
    """
    visible = torch.ones(1, 1, dtype=torch.bool, device=x.device)
    return likelihood_log_posterior(outputs, x[..., None, :], visible, normaliser)[..., 0, :]


def attention_consistency(
    field: AttentionField,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    normaliser: bool = True,
    detach_p: bool = False,
) -> torch.Tensor:
    """Mean ``KL(q || p)`` over heads and real query tokens of one attention field at ``x``: a scalar."""
    B, T, _ = x.shape
    parts = field.posterior(x, attention_mask)
    visible = visible_keys(T, field.causal, attention_mask, x.device)
    log_p = likelihood_log_posterior(parts["scores"], x[:, None], visible, normaliser)
    kl = kl_divergence(parts["q"], log_p.detach() if detach_p else log_p)
    if attention_mask is None:
        return kl.mean()
    real = attention_mask.bool()[:, None, :].expand_as(kl)  # (B, nh, T)
    return kl[real].mean()


def moe_consistency(field: MoEField, x: torch.Tensor, normaliser: bool = True, detach_p: bool = False) -> torch.Tensor:
    """Mean ``KL(router || experts' likelihood posterior)`` over the tokens of ``x``: a scalar."""
    # The router's own softmax, without calling the module: a forward hook a user put on
    # field.router (to read the forward pass's posteriors) must not see this second read.
    q = field.router.logits(x).softmax(-1)  # (..., E)
    outputs = torch.stack([expert(0.0, x) for expert in field.experts], dim=-2)  # (..., E, d)
    log_p = expert_log_posterior(outputs, x, normaliser)
    return kl_divergence(q, log_p.detach() if detach_p else log_p).mean()


@contextmanager
def consistency_recorder(model, parts=PARTS, normaliser: bool = True, detach_p: bool = False):
    """Record each field evaluation's consistency KL during the forward passes run inside.

    Yields a list that, when the block exits, holds the scalar KLs (one per evaluation of an
    attention or MoE field, in the state's dtype, with gradients), so a training step pays one
    forward pass::

        with consistency_recorder(model) as kls:
            out = model(input_ids)
        loss = cross_entropy + beta * torch.stack(kls).mean()

    Args:
        model: any module holding ``AttentionField``s and/or ``MoEField``s.
        parts: which fields to include: "attention", "moe" or both; parts the model lacks are
            skipped.
        normaliser: include the vMF normaliser in the likelihood posteriors.
        detach_p: stop gradients through p (only the posterior q is trained towards it).
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected some of {PARTS}")
    present = [p for p in parts if any(isinstance(m, _KINDS[p]) for m in model.modules())]
    if not present:
        raise ValueError(f"{type(model).__name__} has none of the fields {tuple(parts)}")

    def attention(field, x, context):
        return attention_consistency(field, x, context.get("attention_mask"), normaliser, detach_p).to(x.dtype)

    def moe(field, x, context):
        return moe_consistency(field, x, normaliser, detach_p).to(x.dtype)

    kls = []
    with ExitStack() as stack:
        records = [stack.enter_context(on_calls(model, _KINDS[p], {"attention": attention, "moe": moe}[p]))
                   for p in present]
        yield kls
        kls.extend(value for rec in records for _, value in rec)


def consistency_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    parts=PARTS,
    normaliser: bool = True,
    detach_p: bool = False,
) -> torch.Tensor:
    """``beta`` times the mean consistency KL over the model's attention/MoE field evaluations.

    Runs one forward pass of ``model`` (use ``consistency_recorder`` to share the training
    step's forward pass instead).

    Args:
        model: an ``SVFlow`` (or any module with those fields taking ``(input_ids, attention_mask)``).
        input_ids: ``(B, T)``.
        attention_mask: ``(B, T)`` or None.
        beta: the regulariser's weight.
        parts, normaliser, detach_p: see ``consistency_recorder``.

    Returns:
        A scalar with gradients.
    """
    with consistency_recorder(model, parts, normaliser, detach_p) as kls:
        model(input_ids, attention_mask)
    return beta * torch.stack(kls).mean()
