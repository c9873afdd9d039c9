"""Per-layer, per-head SVFlow metrics of attention: KL(q||p), KL(q||U), KL(p||U) and kappa.

q is the attention posterior, p the likelihood-implied vMF posterior of the same head over the
same visible context, both read at the state the field actually reads (see
docs/maths.md#measurements-on-pretrained-models).
"""

from __future__ import annotations

from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..fields import AttentionField
from .options import Options
from .posteriors import kl_divergence, kl_to_uniform, likelihood_log_posterior, visible_keys
from .recording import layer_of, on_calls

__all__ = ["METRICS", "attention_metrics", "query_weights", "layer_metrics", "layer_batches"]

METRICS = ("kl_qp", "kl_qu", "kl_pu", "kappa")


def attention_metrics(
    field: AttentionField, x: torch.Tensor, attention_mask: torch.Tensor | None = None, options: Options = Options()
) -> dict[str, torch.Tensor]:
    """The metrics of one attention field at state ``x``, per head and query: ``(B, nh, T)`` float64.

    Args:
        field: the attention field.
        x: ``(B, T, d)`` the state it reads.
        attention_mask: ``(B, T)``, 1 for tokens and 0 for padding, or None.
        options: ``kappa`` and ``normaliser`` are used.
    """
    B, T, d = x.shape
    parts = field.posterior(x, attention_mask)
    visible = visible_keys(T, field.causal, attention_mask, x.device)  # (B|1, 1, T, T)
    q = parts["q"].double()  # (B, nh, T, T)
    log_p = likelihood_log_posterior(parts["scores"], x[:, None], visible, options.normaliser)  # (B, nh, T, T)
    if options.kappa == "score":
        kappa = parts["scores"].double().norm(dim=-1)[:, :, None, :]  # (B, nh, 1, T): kappa'_j
    else:
        kappa = parts["kappa"].double()  # (B, nh, T, T): kappa_ij
    kappa = torch.where(visible, kappa, torch.zeros_like(kappa)).sum(-1) / visible.sum(-1)
    return {
        "kl_qp": kl_divergence(q, log_p),
        "kl_qu": kl_to_uniform(q, visible),
        "kl_pu": kl_to_uniform(log_p.exp(), visible),
        "kappa": kappa,
    }


def query_weights(attention_mask: torch.Tensor | None, shape: tuple[int, int], queries: str) -> torch.Tensor:
    """``(B, 1, T)`` float64 weights of the query positions averaged into a layer's value.

    Args:
        attention_mask: ``(B, T)`` or None (no padding).
        shape: ``(B, T)``.
        queries: "all" real tokens, or "last": the last real token of each sequence.
    """
    B, T = shape
    real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if queries == "last":
        last = (real * torch.arange(1, T + 1)).argmax(-1)  # (B,) index of the last real token
        real = torch.nn.functional.one_hot(last, T).bool() & real
    return real.double()[:, None, :]


def layer_batches(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: Options, batch_size: int
) -> Iterator[tuple]:
    """Run ``model`` on batches; yield ``(rows, output, sums, weight)`` per batch.

    ``sums[m]`` is ``(L, nh)``: metric ``m`` summed over the batch's weighted queries (averaged
    over the layer's field evaluations); ``weight`` the total query weight, so that
    ``sum sums / sum weight`` over batches is the mean.
    """
    n_blocks = model.horizon

    def read(field, x, context):
        return attention_metrics(field, x, context.get("attention_mask"), options)

    starts = range(0, len(input_ids), batch_size)
    for start in tqdm(starts, desc="batches", leave=False, disable=len(starts) < 4):
        rows = slice(start, start + batch_size)
        ids = input_ids[rows]
        mask = None if attention_mask is None else attention_mask[rows]
        with torch.no_grad(), on_calls(model, AttentionField, read) as records:
            out = model(ids, mask)
        w = query_weights(mask, ids.shape, options.queries)  # (B, 1, T)
        n_heads = records[0][1]["kl_qp"].shape[1]
        sums = {m: torch.zeros(n_blocks, n_heads, dtype=torch.float64) for m in METRICS}
        calls = torch.zeros(n_blocks, 1, dtype=torch.float64)
        for t, metrics in records:
            k = layer_of(t, n_blocks)
            calls[k] += 1
            for m in METRICS:
                value = metrics[m].cpu()
                sums[m][k] += torch.where(w > 0, value, torch.zeros_like(value)).mul(w).sum((0, 2))
        yield rows, out, {m: s / calls.clamp_min(1) for m, s in sums.items()}, float(w.sum())


def layer_metrics(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    options: Options = Options(),
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Mean metrics per layer and head over the queries of ``input_ids``.

    Works on any SVFlow model with ``AttentionField``s (post-norm, ``PreNorm``, nGPT, converted
    models, any solver); the model runs as configured, in ``torch.no_grad``.

    Args:
        model: an ``SVFlow``.
        input_ids: ``(N, T)`` token ids.
        attention_mask: ``(N, T)`` or None.
        options: the metric definitions.
        batch_size: sequences per forward pass.

    Returns:
        ``{metric: (L, nh) float64}`` for ``METRICS``; layer k is the field evaluated in ``[k, k+1)``.
    """
    totals, weight = None, 0.0
    for _, _, sums, w in layer_batches(model, input_ids, attention_mask, options, batch_size):
        totals = sums if totals is None else {m: totals[m] + sums[m] for m in METRICS}
        weight += w
    return {m: s / weight for m, s in totals.items()}
